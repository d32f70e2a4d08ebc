//! The log's durability and honesty rules against real files: failed fsyncs fence a
//! partition wherever they happen, `never` still fsyncs at seal, a topic directory that
//! lost its metadata is never deleted, retention ages by write time and says when it
//! deletes unread events, and idempotent sequences are checked in order.

use std::time::{Duration, SystemTime};

use flowgate_core::{BatchBuilder, Codec, ProducerStamp};
use flowgate_log::{FsyncPolicy, Log, LogConfig, LogError};

fn batch(first: u64, n: u64, ts: i64, stamp: ProducerStamp) -> Vec<u8> {
    let mut b = BatchBuilder::new();
    for i in first..first + n {
        b.push_payload(ts + i as i64, None, format!("{{\"n\":{i}}}").as_bytes());
    }
    b.finish(Codec::None, stamp).unwrap().bytes
}

/// Small segments; the interval flusher never ticks during a test, so only the fsyncs a
/// test causes happen.
fn small_segments(fsync: FsyncPolicy) -> LogConfig {
    LogConfig {
        fsync,
        fsync_interval_ms: 3_600_000,
        segment_bytes: 2048,
        index_interval_bytes: 512,
        ..LogConfig::default()
    }
}

/// Appends plain batches until the partition has `segments` segments.
fn fill_until_segments(p: &flowgate_log::Partition, segments: usize) {
    let mut i = p.end_offset();
    while p.info().segments < segments {
        p.append(&mut batch(i, 5, 1_000, ProducerStamp::default())).unwrap();
        i += 5;
    }
}

#[test]
fn a_failed_fsync_while_sealing_a_segment_fences_the_partition() {
    for policy in [FsyncPolicy::Always, FsyncPolicy::Interval, FsyncPolicy::Never] {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), small_segments(policy)).unwrap();
        let p = log.topic_or_create("t").unwrap().partition(0).unwrap().clone();
        p.append(&mut batch(0, 5, 1_000, ProducerStamp::default())).unwrap();
        p.inject_fsync_failures(true);
        // Append until one append has to roll: that append seals (and fsyncs) the segment.
        let mut failed = None;
        for i in 1..1_000u64 {
            if let Err(e) = p.append(&mut batch(i * 5, 5, 1_000, ProducerStamp::default())) {
                failed = Some(e);
                break;
            }
        }
        assert!(
            matches!(failed, Some(LogError::Io { action: "fsync", .. })),
            "{policy:?}: sealing must fsync and report the failure: {failed:?}"
        );
        // The disk "recovers", but the page cache can no longer be trusted: fenced.
        p.inject_fsync_failures(false);
        let end = p.end_offset();
        let again = p.append(&mut batch(9_000, 1, 1_000, ProducerStamp::default()));
        assert!(matches!(again, Err(LogError::Io { action: "append after a failed fsync to", .. })), "{again:?}");
        assert_eq!(p.end_offset(), end, "{policy:?}: nothing appended after the failure");
    }
}

#[tokio::test]
async fn a_failed_fsync_fails_the_waiting_acknowledgements() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_segments(FsyncPolicy::Always)).unwrap();
    let p = log.topic_or_create("t").unwrap().partition(0).unwrap().clone();
    p.inject_fsync_failures(true);
    let out = p.append(&mut batch(0, 5, 1_000, ProducerStamp::default())).unwrap();
    let waited = tokio::time::timeout(Duration::from_secs(10), p.wait_durable(out.end_offset())).await;
    assert!(matches!(waited, Ok(Err(LogError::Io { .. }))), "{waited:?}");
}

#[test]
fn never_fsyncs_each_segment_when_it_is_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_segments(FsyncPolicy::Never)).unwrap();
    let p = log.topic_or_create("t").unwrap().partition(0).unwrap().clone();
    assert_eq!(p.durable_offset(), 0);
    fill_until_segments(&p, 3);
    // Every record of the sealed segments is durable; only the active one may not be.
    let active_base = {
        let mut base = 0;
        for entry in std::fs::read_dir(p.dir()).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".log") {
                base = base.max(stem.parse::<u64>().unwrap());
            }
        }
        base
    };
    assert!(active_base > 0);
    assert!(p.durable_offset() >= active_base, "durable {} < sealed end {active_base}", p.durable_offset());
}

#[test]
fn a_topic_directory_that_lost_topic_json_is_never_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let topic_dir = dir.path().join("topics/orders");
    {
        let log = Log::open(dir.path(), LogConfig::default()).unwrap();
        log.create_topic("orders", 2).unwrap();
        let p = log.topic("orders").unwrap().partition(1).unwrap().clone();
        p.append(&mut batch(0, 7, 1_000, ProducerStamp::default())).unwrap();
        log.close().unwrap();
    }
    let meta = std::fs::read(topic_dir.join("topic.json")).unwrap();
    // A power failure lost the metadata file; the data survived.
    std::fs::remove_file(topic_dir.join("topic.json")).unwrap();
    {
        let log = Log::open(dir.path(), LogConfig::default()).unwrap();
        assert!(log.topic("orders").is_none());
        // A write to the topic (auto-create) must not wipe the directory.
        let err = log.topic_or_create("orders").unwrap_err();
        assert!(matches!(err, LogError::OrphanTopicDirectory { .. }), "{err}");
        assert!(err.to_string().contains("topic.json"), "the error says what to restore: {err}");
        let err = log.create_topic("orders", 1).unwrap_err();
        assert!(matches!(err, LogError::OrphanTopicDirectory { .. }), "{err}");
        assert!(topic_dir.join("1/00000000000000000000.log").exists(), "the data is still there");
    }
    // Restoring topic.json brings every event back.
    std::fs::write(topic_dir.join("topic.json"), meta).unwrap();
    let log = Log::open(dir.path(), LogConfig::default()).unwrap();
    assert_eq!(log.topic("orders").unwrap().partition(1).unwrap().end_offset(), 7);
}

#[test]
fn an_empty_leftover_topic_directory_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    // An interrupted create: the directory and an empty partition, no metadata.
    std::fs::create_dir_all(dir.path().join("topics/fresh/0")).unwrap();
    std::fs::write(dir.path().join("topics/fresh/0/00000000000000000000.log"), b"").unwrap();
    let log = Log::open(dir.path(), LogConfig::default()).unwrap();
    let t = log.topic_or_create("fresh").unwrap();
    t.partition(0).unwrap().append(&mut batch(0, 1, 1_000, ProducerStamp::default())).unwrap();
}

fn set_written(path: &std::path::Path, when: SystemTime) {
    std::fs::File::options().write(true).open(path).unwrap().set_modified(when).unwrap();
}

fn segment_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files
}

#[test]
fn retention_ages_segments_by_when_they_were_written_not_by_event_time() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { retention_ms: 3_600_000, ..small_segments(FsyncPolicy::Interval) };
    let log = Log::open(dir.path(), config).unwrap();
    let p = log.topic_or_create("t").unwrap().partition(0).unwrap().clone();
    // A replay of week-old events, written now.
    let week_ago = flowgate_core::time::now_ms() - 7 * 24 * 3_600_000;
    let mut i = 0;
    while p.info().segments < 4 {
        p.append(&mut batch(i, 5, week_ago, ProducerStamp::default())).unwrap();
        i += 5;
    }
    let (deleted, _) = log.enforce_retention().unwrap();
    assert_eq!(deleted, 0, "freshly written segments are not old, whatever their events say");
    assert_eq!(p.start_offset(), 0);

    // Segments really written two hours ago go.
    let files = segment_files(p.dir());
    let two_hours_ago = SystemTime::now() - Duration::from_secs(7_200);
    for f in &files[..2] {
        set_written(f, two_hours_ago);
    }
    let (deleted, _) = log.enforce_retention().unwrap();
    assert_eq!(deleted, 2);
    assert!(p.start_offset() > 0);
    // Absurd event timestamps do not upset the arithmetic either.
    p.append(&mut batch(0, 1, i64::MAX - 10, ProducerStamp::default())).unwrap();
    p.append(&mut batch(0, 1, i64::MIN + 10, ProducerStamp::default())).unwrap();
    log.enforce_retention().unwrap();
}

#[test]
fn retention_counts_and_reports_events_a_consumer_had_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { retention_bytes: 4096, ..small_segments(FsyncPolicy::Interval) };
    let log = Log::open(dir.path(), config).unwrap();
    let p = log.topic_or_create("t").unwrap().partition(0).unwrap().clone();
    // A pipeline that has committed offset 12 only, and one that is fully caught up.
    log.set_consumer_offset("slow-pipeline", "t", 0, 12);
    fill_until_segments(&p, 6);
    log.set_consumer_offset("fast-pipeline", "t", 0, p.end_offset());
    log.set_consumer_offset("ghost", "no-such-topic", 0, 0);
    let (deleted, _) = log.enforce_retention().unwrap();
    assert!(deleted > 0);
    let start = p.start_offset();
    assert!(start > 12);
    assert_eq!(p.unread_deleted_events(), start - 12, "exactly the deleted offsets above the slow commit");
    assert_eq!(log.unread_deleted_events(), start - 12);
    assert_eq!(log.topic_infos()[0].partitions[0].unread_deleted_events, start - 12);

    // Once every consumer is past the deleted range, nothing more is counted.
    log.set_consumer_offset("slow-pipeline", "t", 0, p.end_offset());
    fill_until_segments(&p, 8);
    let before = p.unread_deleted_events();
    log.set_consumer_offset("slow-pipeline", "t", 0, p.end_offset());
    log.set_consumer_offset("fast-pipeline", "t", 0, p.end_offset());
    assert!(log.enforce_retention().unwrap().0 > 0);
    assert_eq!(p.unread_deleted_events(), before);
}

fn stamp(producer_id: u64, sequence: u64) -> ProducerStamp {
    ProducerStamp { producer_id, sequence }
}

#[test]
fn idempotent_sequences_are_checked_in_order_and_survive_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_segments(FsyncPolicy::Interval);
    {
        let log = Log::open(dir.path(), config.clone()).unwrap();
        let p = log.topic_or_create("t").unwrap().partition(0).unwrap().clone();
        let err = p.append(&mut batch(0, 2, 1_000, stamp(5, 3))).unwrap_err();
        assert!(matches!(err, LogError::UnknownProducer { .. }), "a producer's first batch is sequence 0: {err}");
        p.append(&mut batch(0, 2, 1_000, stamp(5, 0))).unwrap();
        // Sequence 1 was lost on the way; 2 must not be stored, nor reported stored.
        let err = p.append(&mut batch(0, 2, 1_000, stamp(5, 2))).unwrap_err();
        assert!(matches!(err, LogError::OutOfOrderSequence { expected: 1, .. }), "{err}");
        assert_eq!(p.end_offset(), 2);
        for seq in 1..20 {
            let out = p.append(&mut batch(seq * 2, 2, 1_000, stamp(5, seq))).unwrap();
            assert!(!out.duplicate);
        }
        let retry = p.append(&mut batch(38, 2, 1_000, stamp(5, 19))).unwrap();
        assert!(retry.duplicate);
        assert_eq!(retry.first_offset, 38);
        let err = p.append(&mut batch(0, 2, 1_000, stamp(5, 3))).unwrap_err();
        assert!(matches!(err, LogError::DuplicateSequence { last_sequence: 19, .. }), "stored long ago: {err}");
        fill_until_segments(&p, 4);
    }
    // After a restart (producer state from the roll snapshot plus the active segment).
    let log = Log::open(dir.path(), config).unwrap();
    let p = log.topic("t").unwrap().partition(0).unwrap().clone();
    let end = p.end_offset();
    let err = p.append(&mut batch(0, 2, 1_000, stamp(5, 21))).unwrap_err();
    assert!(matches!(err, LogError::OutOfOrderSequence { expected: 20, .. }), "{err}");
    assert!(p.append(&mut batch(38, 2, 1_000, stamp(5, 19))).unwrap().duplicate);
    assert_eq!(p.end_offset(), end);
    assert!(!p.append(&mut batch(40, 2, 1_000, stamp(5, 20))).unwrap().duplicate);
}

/// Positions of the batches in a segment file.
fn batch_positions(bytes: &[u8]) -> Vec<usize> {
    let mut positions = Vec::new();
    let mut pos = 0;
    while let Some(total) = flowgate_core::BatchHeader::peek_total_len(&bytes[pos..]) {
        positions.push(pos);
        pos += total as usize;
        if pos >= bytes.len() {
            break;
        }
    }
    positions
}

#[test]
fn absurd_base_offsets_in_a_damaged_sealed_segment_are_survived() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_segments(FsyncPolicy::Interval);
    let part = dir.path().join("topics/t/0");
    {
        let log = Log::open(dir.path(), config.clone()).unwrap();
        let p = log.topic_or_create("t").unwrap().partition(0).unwrap().clone();
        fill_until_segments(&p, 4);
        log.close().unwrap();
    }
    // The second segment (sealed, base > 0): damage one batch's records, then give the
    // batches after it base offsets no arithmetic may trust (the checksum does not cover
    // base offsets).
    let files = segment_files(&part);
    let target = &files[1];
    let mut bytes = std::fs::read(target).unwrap();
    let positions = batch_positions(&bytes);
    assert!(positions.len() >= 4, "{positions:?}");
    let last_byte = positions[1] - 1;
    bytes[last_byte] ^= 0xFF;
    bytes[positions[1]..positions[1] + 8].copy_from_slice(&(u64::MAX - 1).to_le_bytes());
    bytes[positions[2]..positions[2] + 8].copy_from_slice(&0u64.to_le_bytes());
    bytes[positions[3]..positions[3] + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(target, &bytes).unwrap();
    for ext in ["index", "timeindex"] {
        let _ = std::fs::remove_file(target.with_extension(ext));
    }
    let report = flowgate_log::check_data_dir(dir.path()).unwrap();
    assert!(!report.is_clean());
    // Opening rebuilds the damaged segment's indexes without trusting those offsets.
    let log = Log::open(dir.path(), config).unwrap();
    let p = log.topic("t").unwrap().partition(0).unwrap().clone();
    let end = p.end_offset();
    p.append(&mut batch(0, 1, 1_000, ProducerStamp::default())).unwrap();
    assert_eq!(p.end_offset(), end + 1);
}

#[tokio::test]
async fn make_durable_fsyncs_whatever_the_policy_and_reports_a_failed_fsync() {
    for policy in [FsyncPolicy::Never, FsyncPolicy::Interval, FsyncPolicy::Always] {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), LogConfig { fsync: policy, ..LogConfig::default() }).unwrap();
        let p = log.topic_or_create("t").unwrap().partition(0).unwrap().clone();
        let end = p.append(&mut batch(0, 10, 1_000, ProducerStamp::default())).unwrap().end_offset();
        p.make_durable(end).await.unwrap();
        assert!(p.durable_offset() >= end, "{policy:?}: durable {} < {end}", p.durable_offset());

        // A checkpoint must never move past output whose fsync failed.
        let end = p.append(&mut batch(end, 10, 1_000, ProducerStamp::default())).unwrap().end_offset();
        p.inject_fsync_failures(true);
        assert!(p.make_durable(end).await.is_err(), "{policy:?}: a failed fsync must be an error");
        assert!(p.durable_offset() < end);
    }
}
