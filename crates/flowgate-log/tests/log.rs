//! The log against real files: appends, reads, recovery from damage, idempotence,
//! retention, timestamps, group commit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use flowgate_core::{BatchBuilder, BatchView, Codec, ProducerStamp};
use flowgate_log::{check_data_dir, FsyncPolicy, Log, LogConfig, LogError, LogObserver};

fn batch(first: u64, n: u64, ts: i64, stamp: ProducerStamp) -> Vec<u8> {
    let mut b = BatchBuilder::new();
    for i in first..first + n {
        b.push_payload(ts + i as i64, Some(format!("k{i}").as_bytes()), format!("{{\"n\":{i}}}").as_bytes());
    }
    b.finish(Codec::None, stamp).unwrap().bytes
}

fn payloads(bytes: &[u8]) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut rest = bytes;
    let mut scratch = Vec::new();
    while !rest.is_empty() {
        let (view, tail) = BatchView::parse(rest).unwrap();
        for r in view.records(&mut scratch).unwrap() {
            let r = r.unwrap();
            out.push((view.base_offset() + u64::from(r.offset_delta), String::from_utf8(r.payload.to_vec()).unwrap()));
        }
        rest = tail;
    }
    out
}

fn read_all(log: &Log, topic: &str) -> Vec<(u64, String)> {
    let p = log.topic(topic).unwrap().partition(0).unwrap().clone();
    let mut offset = p.start_offset();
    let mut out = Vec::new();
    while offset < p.end_offset() {
        let r = p.read(offset, 64 * 1024).unwrap();
        let got: Vec<_> = payloads(&r.batches).into_iter().filter(|(o, _)| *o >= offset).collect();
        offset = got.last().unwrap().0 + 1;
        out.extend(got);
    }
    out
}

fn small_segments() -> LogConfig {
    LogConfig { segment_bytes: 4096, index_interval_bytes: 512, ..LogConfig::default() }
}

#[test]
fn appends_are_read_back_in_order_across_segments_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = Log::open(dir.path(), small_segments()).unwrap();
        let p = log.topic_or_create("t").unwrap().partition(0).unwrap().clone();
        for i in 0..200u64 {
            let out = p.append(&mut batch(i * 5, 5, 1000, ProducerStamp::default())).unwrap();
            assert_eq!(out.first_offset, i * 5);
        }
        assert!(p.info().segments > 5, "small segments must roll: {:?}", p.info());
        let all = read_all(&log, "t");
        assert_eq!(all.len(), 1000);
        // A read from the middle starts with the batch that holds the offset.
        let r = p.read(537, 100).unwrap();
        let got = payloads(&r.batches);
        assert!(got.first().unwrap().0 <= 537 && got.last().unwrap().0 >= 537);
        log.close().unwrap();
    }
    let log = Log::open(dir.path(), small_segments()).unwrap();
    let all = read_all(&log, "t");
    assert_eq!(all.len(), 1000);
    for (i, (offset, payload)) in all.iter().enumerate() {
        assert_eq!(*offset, i as u64);
        assert_eq!(payload, &format!("{{\"n\":{i}}}"));
    }
    let p = log.topic("t").unwrap().partition(0).unwrap().clone();
    assert_eq!(p.append(&mut batch(1000, 1, 1000, ProducerStamp::default())).unwrap().first_offset, 1000);
    assert!(matches!(p.read(1002, 10), Err(LogError::OffsetOutOfRange { .. })));
    assert!(p.read(1001, 10).unwrap().batches.is_empty());
}

#[test]
fn a_retried_batch_is_stored_once_even_after_restart_and_rolls() {
    let dir = tempfile::tempdir().unwrap();
    let stamp = |seq| ProducerStamp { producer_id: 42, sequence: seq };
    {
        let log = Log::open(dir.path(), small_segments()).unwrap();
        let p = log.topic_or_create("t").unwrap().partition(0).unwrap().clone();
        let first = p.append(&mut batch(0, 3, 0, stamp(0))).unwrap();
        let retry = p.append(&mut batch(0, 3, 0, stamp(0))).unwrap();
        assert!(retry.duplicate);
        assert_eq!(retry.first_offset, first.first_offset);
        assert_eq!(p.end_offset(), 3);
        // Push the producer's batch into an older segment.
        for i in 0..100 {
            p.append(&mut batch(100 + i * 5, 5, 0, ProducerStamp::default())).unwrap();
        }
        assert!(p.info().segments > 2);
    }
    let log = Log::open(dir.path(), small_segments()).unwrap();
    let p = log.topic("t").unwrap().partition(0).unwrap().clone();
    let end = p.end_offset();
    let retry = p.append(&mut batch(0, 3, 0, stamp(0))).unwrap();
    assert!(retry.duplicate, "the snapshot taken at roll must remember producer 42");
    assert_eq!(retry.first_offset, 0);
    assert_eq!(p.end_offset(), end);
    let next = p.append(&mut batch(0, 3, 0, stamp(1))).unwrap();
    assert!(!next.duplicate);
}

/// Every byte position of a truncated last batch, and a flipped bit at many positions:
/// the log opens, keeps every earlier batch, cuts the damage, and `check` saw it first.
#[test]
fn recovery_cuts_a_torn_or_damaged_tail_and_keeps_the_rest() {
    let template = tempfile::tempdir().unwrap();
    let segment = template.path().join("topics/t/0/00000000000000000000.log");
    let (good_len, full_len) = {
        let log = Log::open(template.path(), LogConfig::default()).unwrap();
        let p = log.topic_or_create("t").unwrap().partition(0).unwrap().clone();
        for i in 0..3 {
            p.append(&mut batch(i * 4, 4, 0, ProducerStamp::default())).unwrap();
        }
        let good = p.info().size_bytes;
        p.append(&mut batch(12, 4, 0, ProducerStamp::default())).unwrap();
        log.close().unwrap();
        (good, p.info().size_bytes)
    };
    let original = std::fs::read(&segment).unwrap();
    assert_eq!(original.len() as u64, full_len);

    let mut cases: Vec<Vec<u8>> = (good_len..full_len).map(|cut| original[..cut as usize].to_vec()).collect();
    for bit in (good_len * 8..full_len * 8).step_by(7) {
        let mut damaged = original.clone();
        damaged[(bit / 8) as usize] ^= 1 << (bit % 8);
        cases.push(damaged);
    }
    for (n, bytes) in cases.iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("topics/t/0");
        std::fs::create_dir_all(&part).unwrap();
        std::fs::copy(template.path().join("topics/t/topic.json"), dir.path().join("topics/t/topic.json")).unwrap();
        std::fs::write(part.join("00000000000000000000.log"), bytes).unwrap();
        let truncated_cleanly = bytes.len() as u64 == good_len;
        let report = check_data_dir(dir.path()).unwrap();
        assert_eq!(report.is_clean(), truncated_cleanly, "case {n}: check report {report:?}");
        if !truncated_cleanly {
            assert_eq!(report.corrupt[0].position, good_len, "case {n}: damage found at the wrong place");
        }
        let log = Log::open(dir.path(), LogConfig::default()).unwrap();
        let all = read_all(&log, "t");
        assert_eq!(all.len(), 12, "case {n}: earlier batches must survive");
        let p = log.topic("t").unwrap().partition(0).unwrap().clone();
        assert_eq!(p.end_offset(), 12);
        assert_eq!(p.append(&mut batch(12, 1, 0, ProducerStamp::default())).unwrap().first_offset, 12);
        drop(log);
        assert!(check_data_dir(dir.path()).unwrap().is_clean(), "case {n}: the cut tail must be gone");
    }
}

#[test]
fn check_lists_damage_in_the_middle_of_a_sealed_segment() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = Log::open(dir.path(), LogConfig::default()).unwrap();
        let p = log.topic_or_create("t").unwrap().partition(0).unwrap().clone();
        for i in 0..5 {
            p.append(&mut batch(i * 4, 4, 0, ProducerStamp::default())).unwrap();
        }
        log.close().unwrap();
    }
    let seg = dir.path().join("topics/t/0/00000000000000000000.log");
    let mut bytes = std::fs::read(&seg).unwrap();
    let one = batch(0, 4, 0, ProducerStamp::default()).len();
    bytes[one + 70] ^= 0xff; // inside the second batch's records
    std::fs::write(&seg, &bytes).unwrap();
    let report = check_data_dir(dir.path()).unwrap();
    assert_eq!(report.corrupt.len(), 1, "{report:?}");
    assert_eq!(report.corrupt[0].position, one as u64);
    assert_eq!(report.corrupt[0].end, 2 * one as u64);
    assert_eq!(report.batches, 4);
}

#[test]
fn offsets_for_timestamps() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_segments()).unwrap();
    let p = log.topic_or_create("t").unwrap().partition(0).unwrap().clone();
    // Record i has timestamp 10_000 + 10 * i.
    for chunk in 0..100u64 {
        let mut b = BatchBuilder::new();
        for i in chunk * 10..chunk * 10 + 10 {
            b.push_payload(10_000 + 10 * i as i64, None, b"{}");
        }
        p.append(&mut b.finish(Codec::None, ProducerStamp::default()).unwrap().bytes).unwrap();
    }
    assert_eq!(p.offset_for_timestamp(0).unwrap(), Some(0));
    assert_eq!(p.offset_for_timestamp(10_000).unwrap(), Some(0));
    assert_eq!(p.offset_for_timestamp(10_001).unwrap(), Some(1));
    assert_eq!(p.offset_for_timestamp(10_000 + 10 * 537).unwrap(), Some(537));
    assert_eq!(p.offset_for_timestamp(10_000 + 10 * 537 - 3).unwrap(), Some(537));
    assert_eq!(p.offset_for_timestamp(10_000 + 10 * 999).unwrap(), Some(999));
    assert_eq!(p.offset_for_timestamp(10_000 + 10 * 999 + 1).unwrap(), None);
}

#[test]
fn retention_deletes_whole_old_segments_by_bytes_and_by_age() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { retention_bytes: 16 * 1024, ..small_segments() };
    let log = Log::open(dir.path(), config).unwrap();
    let p = log.topic_or_create("t").unwrap().partition(0).unwrap().clone();
    let now = flowgate_core::time::now_ms();
    for i in 0..400u64 {
        p.append(&mut batch(i * 5, 5, now, ProducerStamp::default())).unwrap();
    }
    let before = p.info();
    let (deleted, _) = log.enforce_retention().unwrap();
    let after = p.info();
    assert!(deleted > 0);
    assert!(after.size_bytes <= 16 * 1024 + 4096, "{after:?}");
    assert!(after.size_bytes >= 16 * 1024 - 4096, "{after:?}");
    assert_eq!(after.end_offset, before.end_offset);
    assert!(after.start_offset > 0);
    assert!(matches!(p.read(0, 100), Err(LogError::OffsetOutOfRange { .. })));
    assert!(!p.read(after.start_offset, 100).unwrap().batches.is_empty());

    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { retention_ms: 60_000, ..small_segments() };
    let log = Log::open(dir.path(), config).unwrap();
    let p = log.topic_or_create("t").unwrap().partition(0).unwrap().clone();
    for i in 0..100u64 {
        p.append(&mut batch(i * 5, 5, now, ProducerStamp::default())).unwrap();
    }
    // Age is the segment file's write time: make what is written so far an hour old.
    let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3_600);
    for entry in std::fs::read_dir(p.dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "log") {
            std::fs::File::options().write(true).open(&path).unwrap().set_modified(hour_ago).unwrap();
        }
    }
    for i in 100..200u64 {
        p.append(&mut batch(i * 5, 5, now, ProducerStamp::default())).unwrap();
    }
    log.enforce_retention().unwrap();
    let start = p.start_offset();
    assert!((400..=500).contains(&start), "hour-old segments go, fresh ones stay: start {start}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_always_shares_one_fsync_between_concurrent_appends() {
    let dir = tempfile::tempdir().unwrap();
    let fsyncs = Arc::new(AtomicUsize::new(0));
    let counter = fsyncs.clone();
    let observer = LogObserver {
        on_fsync: Some(Arc::new(move |_| {
            counter.fetch_add(1, Ordering::Relaxed);
        })),
    };
    let config = LogConfig { fsync: FsyncPolicy::Always, ..LogConfig::default() };
    let log = Log::open_with(dir.path(), config, observer).unwrap();
    let p = log.topic_or_create("t").unwrap().partition(0).unwrap().clone();
    let appends = 400;
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..appends / 8 {
                let out = p.append(&mut batch(t * 1000 + i, 1, 0, ProducerStamp::default())).unwrap();
                p.wait_durable(out.end_offset()).await.unwrap();
                assert!(p.durable_offset() >= out.end_offset());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let n = fsyncs.load(Ordering::Relaxed);
    assert!(n > 0);
    assert!(n < appends as usize, "{n} fsyncs for {appends} acknowledged appends: no group commit");
    assert_eq!(p.durable_offset(), appends);
}

#[test]
fn topics_are_created_listed_reopened_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { auto_create_topics: false, ..LogConfig::default() };
    let log = Log::open(dir.path(), config.clone()).unwrap();
    assert!(matches!(log.topic_or_create("nope"), Err(LogError::UnknownTopic(_))));
    log.create_topic("orders", 4).unwrap();
    assert!(matches!(log.create_topic("orders", 4), Err(LogError::TopicExists(_))));
    assert!(matches!(log.create_topic("../evil", 1), Err(LogError::InvalidTopicName { .. })));
    assert!(matches!(log.create_topic("ok", 0), Err(LogError::InvalidTopicName { .. })));
    log.topic("orders").unwrap().partition(3).unwrap().append(&mut batch(0, 2, 0, ProducerStamp::default())).unwrap();
    drop(log);
    let log = Log::open(dir.path(), config.clone()).unwrap();
    let infos = log.topic_infos();
    assert_eq!(infos.len(), 1);
    assert_eq!(infos[0].partitions.len(), 4);
    assert_eq!(infos[0].partitions[3].end_offset, 2);
    log.delete_topic("orders").unwrap();
    assert!(log.topic("orders").is_none());
    drop(log);
    assert!(Log::open(dir.path(), config).unwrap().topics().is_empty());
}

#[test]
fn topics_past_max_partitions_are_refused_whether_created_or_written_first() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { max_partitions: 10, default_partitions: 3, ..LogConfig::default() };
    let log = Log::open(dir.path(), config).unwrap();
    log.create_topic("a", 6).unwrap();
    log.topic_or_create("b").unwrap();
    let err = log.create_topic("c", 2).unwrap_err();
    assert!(matches!(err, LogError::PartitionLimit { held: 9, asked: 2, max: 10 }), "{err}");
    assert!(err.to_string().contains("log.max_partitions"), "{err}");
    assert!(matches!(log.topic_or_create("d"), Err(LogError::PartitionLimit { .. })), "auto-creation too");
    assert!(!dir.path().join("topics/c").exists() && !dir.path().join("topics/d").exists(), "nothing was created");
    log.create_topic("e", 1).unwrap();
    log.delete_topic("a").unwrap();
    log.create_topic("c", 2).unwrap();
}
