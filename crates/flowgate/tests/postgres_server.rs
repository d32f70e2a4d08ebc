//! The private PostgreSQL server the connector tests run against: logical WAL, and data
//! that survives a restart and a crash of the server.

mod common;

use common::postgres::PgServer;

#[test]
fn a_private_server_has_logical_wal_and_keeps_committed_rows_across_a_restart_and_a_crash() {
    let mut pg = PgServer::start();
    assert_eq!(pg.psql("show wal_level"), "logical");
    pg.psql("create table t (id int primary key, v text); insert into t values (1, 'a')");
    pg.stop();
    assert!(pg.try_psql("select 1").is_err(), "stopped");
    pg.start_again();
    pg.psql("insert into t values (2, 'b')");
    pg.crash();
    pg.start_again();
    assert_eq!(pg.psql("select string_agg(v, ',' order by id) from t"), "a,b");
    let slot = pg.psql("select lsn from pg_create_logical_replication_slot('s', 'pgoutput')");
    assert!(slot.contains('/'), "{slot}");
}
