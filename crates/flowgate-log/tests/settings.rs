//! Topic settings against real files: each topic's own retention and compression, their
//! file across restarts, data directories from before settings, damaged settings files.

use flowgate_core::{BatchBuilder, BatchHeader, Codec, ProducerStamp};
use flowgate_log::settings::{MAX_SETTING_VALUE, SETTINGS_FILE};
use flowgate_log::{Appender, Change, Log, LogConfig, LogError, Route, Scratch, SettingsChange, TopicSettings};

fn small_segments() -> LogConfig {
    LogConfig { segment_bytes: 4096, index_interval_bytes: 512, ..LogConfig::default() }
}

/// Appends `batches` batches of 5 events to partition 0 of `topic` through an
/// uncompressed appender (as the listeners would, had they no codec).
fn fill(log: &Log, topic: &str, batches: u64) {
    let t = log.topic(topic).unwrap();
    let appender = Appender::new(Codec::None);
    let mut scratch = Scratch::default();
    let now = flowgate_core::time::now_ms();
    for i in 0..batches {
        let mut b = BatchBuilder::new();
        for j in 0..5 {
            b.push_payload(now, None, format!("{{\"n\":{i},\"j\":{j},\"pad\":\"{}\"}}", "x".repeat(40)).as_bytes());
        }
        appender.append_built(&t, Route::Partition(0), &mut b, ProducerStamp::default(), &mut scratch).unwrap();
    }
}

/// Sets the modification time of every segment file of `topic`'s partition 0 to an hour
/// ago: retention's idea of age.
fn age_segments(log: &Log, topic: &str) {
    let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3_600);
    let dir = log.topic(topic).unwrap().partition(0).unwrap().dir().to_path_buf();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "log") {
            std::fs::File::options().write(true).open(&path).unwrap().set_modified(hour_ago).unwrap();
        }
    }
}

fn codecs_stored(log: &Log, topic: &str) -> Vec<Codec> {
    let p = log.topic(topic).unwrap().partition(0).unwrap().clone();
    let read = p.read(p.start_offset(), 1 << 20).unwrap();
    let mut rest = &read.batches[..];
    let mut codecs = Vec::new();
    while !rest.is_empty() {
        let h = BatchHeader::parse(rest).unwrap();
        codecs.push(h.codec().unwrap());
        rest = &rest[h.total_len()..];
    }
    codecs
}

#[test]
fn each_topic_is_retained_by_its_own_limits() {
    let dir = tempfile::tempdir().unwrap();
    // The default keeps an hour-old segment (a week); "short" keeps one for a minute.
    let log = Log::open(dir.path(), small_segments()).unwrap();
    let short = TopicSettings { retention_ms: Some(60_000), ..Default::default() };
    log.create_topic_with("short", 1, &short).unwrap();
    log.create_topic("default", 1).unwrap();
    let by_bytes = TopicSettings { retention_bytes: Some(8 * 1024), ..Default::default() };
    log.create_topic_with("small", 1, &by_bytes).unwrap();
    for t in ["short", "default", "small"] {
        fill(&log, t, 200);
        age_segments(&log, t);
        fill(&log, t, 1);
    }
    let (deleted, _) = log.enforce_retention().unwrap();
    assert!(deleted > 0);
    let start = |t: &str| log.topic(t).unwrap().partition(0).unwrap().start_offset();
    let size = |t: &str| log.topic(t).unwrap().partition(0).unwrap().info().size_bytes;
    assert!(start("short") > 900, "every hour-old sealed segment went: start {}", start("short"));
    assert_eq!(start("default"), 0, "the default (7 days) keeps them");
    assert!(start("small") > 0 && size("small") <= 8 * 1024 + 4096, "size {}", size("small"));

    // Back to the default: nothing more goes, even once the rest is old.
    let unset = SettingsChange { retention_ms: Change::Unset, ..Default::default() };
    let (before, after) = log.alter_topic("short", &unset).unwrap();
    assert_eq!((before, after), (short, TopicSettings::default()));
    fill(&log, "short", 100);
    age_segments(&log, "short");
    fill(&log, "short", 1);
    let kept = start("short");
    log.enforce_retention().unwrap();
    assert_eq!(start("short"), kept);

    // A log-wide default of 0 (keep forever) does not stop a topic's own limit.
    drop(log);
    let log = Log::open(dir.path(), LogConfig { retention_ms: 0, ..small_segments() }).unwrap();
    log.alter_topic("default", &SettingsChange { retention_ms: Change::Set(1000), ..Default::default() }).unwrap();
    log.enforce_retention().unwrap();
    assert!(log.topic("default").unwrap().partition(0).unwrap().start_offset() > 900);
}

#[test]
fn settings_survive_restarts_and_a_topic_without_them_follows_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), LogConfig::default()).unwrap();
    let own =
        TopicSettings { retention_ms: Some(1000), retention_bytes: Some(5 << 20), compression: Some(Codec::Zstd) };
    log.create_topic_with("own", 2, &own).unwrap();
    log.create_topic("plain", 1).unwrap();
    assert!(!dir.path().join("topics/plain").join(SETTINGS_FILE).exists(), "no settings, no file");
    let change =
        SettingsChange { retention_bytes: Change::Unset, compression: Change::Set(Codec::Lz4), ..Default::default() };
    log.alter_topic("own", &change).unwrap();
    drop(log);

    // Interrupted atomic writes leave temporary files; they go at the next start.
    for tmp in ["topic.json.tmp", "settings.json.tmp"] {
        std::fs::write(dir.path().join("topics/own").join(tmp), b"{\"half").unwrap();
    }

    // A topic written by a flowgate from before settings: topic.json alone.
    let old = dir.path().join("topics/old");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(old.join("topic.json"), br#"{"partitions": 1, "created_ms": 5}"#).unwrap();

    let config = LogConfig { retention_ms: 12_345, ..LogConfig::default() };
    let log = Log::open(dir.path(), config.clone()).unwrap();
    let t = log.topic("own").unwrap();
    let expected = TopicSettings { retention_ms: Some(1000), retention_bytes: None, compression: Some(Codec::Lz4) };
    assert_eq!(t.settings(), expected);
    assert_eq!(t.compression(), Some(Codec::Lz4));
    assert_eq!(t.retention(&config).unwrap().ms, 1000);
    assert_eq!(t.retention(&config).unwrap().bytes, 0, "the default");
    for name in ["plain", "old"] {
        let t = log.topic(name).unwrap();
        assert_eq!(t.settings(), TopicSettings::default());
        assert_eq!(t.settings_error(), None);
        assert_eq!(t.retention(&config).unwrap().ms, 12_345);
    }
    assert_eq!(log.topic("old").unwrap().created_ms(), 5);
    assert!(!dir.path().join("topics/own/settings.json.tmp").exists());
    assert!(!dir.path().join("topics/own/topic.json.tmp").exists());
}

#[test]
fn a_damaged_settings_file_suspends_retention_until_the_settings_are_written_again() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_segments()).unwrap();
    let own = TopicSettings { retention_ms: Some(0), compression: Some(Codec::Zstd), ..Default::default() };
    log.create_topic_with("t", 1, &own).unwrap();
    fill(&log, "t", 200);
    age_segments(&log, "t");
    fill(&log, "t", 1);
    drop(log);
    // Flip one digit: still JSON, but not the settings the log wrote.
    let path = dir.path().join("topics/t").join(SETTINGS_FILE);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("\"retention_ms\":0", "\"retention_ms\":1")).unwrap();

    // The default would delete the hour-old segments; nothing goes on a guess.
    let config = LogConfig { retention_ms: 1000, ..small_segments() };
    let log = Log::open(dir.path(), config).unwrap();
    let t = log.topic("t").unwrap();
    let error = t.settings_error().unwrap();
    assert!(error.contains("checksum mismatch"), "{error}");
    assert_eq!(t.settings(), TopicSettings::default());
    assert_eq!(t.compression(), None, "batches use the default codec");
    assert_eq!(log.enforce_retention().unwrap().0, 0);
    assert_eq!(t.partition(0).unwrap().start_offset(), 0);
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        text.replace("\"retention_ms\":0", "\"retention_ms\":1"),
        "left as found"
    );

    // A change of some settings is refused: the rest are unknown, and the defaults in
    // their place would delete what the topic meant to keep.
    let err = log.alter_topic("t", &SettingsChange { retention_ms: Change::Set(0), ..Default::default() }).unwrap_err();
    assert!(err.to_string().contains("give every setting"), "{err}");
    assert!(t.settings_error().is_some());
    assert_eq!(log.enforce_retention().unwrap().0, 0, "still nothing deleted");
    // One giving every setting writes a whole new file.
    let every =
        SettingsChange { retention_ms: Change::Set(0), retention_bytes: Change::Unset, compression: Change::Unset };
    log.alter_topic("t", &every).unwrap();
    assert_eq!(t.settings_error(), None);
    assert_eq!(t.settings(), TopicSettings { retention_ms: Some(0), ..Default::default() });
    drop(log);
    let log = Log::open(dir.path(), small_segments()).unwrap();
    assert_eq!(log.topic("t").unwrap().settings_error(), None);

    // A file cut short (a torn write) is caught the same way.
    std::fs::write(&path, &text.as_bytes()[..text.len() / 2]).unwrap();
    drop(log);
    let log = Log::open(dir.path(), small_segments()).unwrap();
    assert!(log.topic("t").unwrap().settings_error().unwrap().contains("not a settings file"));
}

#[test]
fn a_topic_directory_left_with_settings_but_no_topic_json_is_replaced_on_create() {
    // A crash after settings.json was written but before topic.json: not a topic.
    let dir = tempfile::tempdir().unwrap();
    let left = dir.path().join("topics/t");
    std::fs::create_dir_all(left.join("0")).unwrap();
    let stale = TopicSettings { retention_ms: Some(1), ..Default::default() };
    std::fs::write(left.join(SETTINGS_FILE), serde_json::to_vec(&stale).unwrap()).unwrap();
    let log = Log::open(dir.path(), LogConfig::default()).unwrap();
    assert!(log.topic("t").is_none());
    log.create_topic("t", 1).unwrap();
    assert_eq!(log.topic("t").unwrap().settings(), TopicSettings::default());
    assert!(!left.join(SETTINGS_FILE).exists());
}

#[test]
fn the_topics_codec_applies_to_batches_the_server_encodes_and_not_to_client_batches() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), LogConfig::default()).unwrap();
    log.create_topic_with("z", 1, &TopicSettings { compression: Some(Codec::Zstd), ..Default::default() }).unwrap();
    log.create_topic("plain", 1).unwrap();
    fill(&log, "z", 2);
    fill(&log, "plain", 1);
    // A client's batch, encoded by the client: stored as it came.
    let mut b = BatchBuilder::new();
    b.push_payload(1, None, b"{}");
    let mut client = b.finish(Codec::Lz4, ProducerStamp::default()).unwrap().bytes;
    let appender = Appender::new(Codec::None);
    appender
        .append_encoded(&log.topic("z").unwrap(), Route::Partition(0), &mut client, &mut Scratch::default())
        .unwrap();
    assert_eq!(codecs_stored(&log, "z"), [Codec::Zstd, Codec::Zstd, Codec::Lz4]);
    assert_eq!(codecs_stored(&log, "plain"), [Codec::None], "the appender's own codec");
    assert_eq!(appender.codec_for(&log.topic("z").unwrap()), Codec::Zstd);

    log.alter_topic("z", &SettingsChange { compression: Change::Set(Codec::None), ..Default::default() }).unwrap();
    fill(&log, "z", 1);
    assert_eq!(codecs_stored(&log, "z").last(), Some(&Codec::None));
}

#[test]
fn values_out_of_range_and_unknown_topics_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), LogConfig::default()).unwrap();
    let huge = TopicSettings { retention_bytes: Some(MAX_SETTING_VALUE + 1), ..Default::default() };
    let err = log.create_topic_with("t", 1, &huge).unwrap_err();
    assert!(matches!(err, LogError::InvalidSetting { setting: "retention_bytes", .. }), "{err}");
    assert!(log.topic("t").is_none() && !dir.path().join("topics/t").exists());
    log.create_topic("t", 1).unwrap();
    let err = log
        .alter_topic("t", &SettingsChange { retention_ms: Change::Set(u64::MAX), ..Default::default() })
        .unwrap_err();
    assert!(err.to_string().contains("retention_ms") && err.to_string().contains("2^53"), "{err}");
    assert_eq!(log.topic("t").unwrap().settings(), TopicSettings::default());
    let err = log.alter_topic("nope", &SettingsChange::default()).unwrap_err();
    assert!(matches!(err, LogError::UnknownTopic(_)), "{err}");
    // The largest value is fine.
    let max = SettingsChange { retention_ms: Change::Set(MAX_SETTING_VALUE), ..Default::default() };
    log.alter_topic("t", &max).unwrap();
}

#[test]
fn a_settings_change_waits_for_a_deletion_under_the_old_limits_and_readers_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_segments()).unwrap();
    let topic = log.create_topic("t", 1).unwrap();
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let retention = {
        let (topic, order) = (topic.clone(), order.clone());
        let config = small_segments();
        std::thread::spawn(move || {
            topic.under_retention(&config, |_limits| {
                entered_tx.send(()).unwrap();
                release_rx.recv().unwrap();
                order.lock().unwrap().push("deleted under the old limits");
            })
        })
    };
    entered_rx.recv().unwrap();
    let alter = {
        let (log, order) = (log.clone(), order.clone());
        std::thread::spawn(move || {
            log.alter_topic("t", &SettingsChange { retention_ms: Change::Set(1), ..Default::default() }).unwrap();
            order.lock().unwrap().push("change acknowledged");
        })
    };
    // Readers of the settings go on meanwhile (metrics, describe).
    assert_eq!(topic.settings(), TopicSettings::default());
    // Nothing to poll for: the change must still be waiting after this pause.
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(order.lock().unwrap().is_empty(), "the change was acknowledged while a deletion ran under the old limits");
    release_tx.send(()).unwrap();
    retention.join().unwrap().expect("the settings file is readable");
    alter.join().unwrap();
    assert_eq!(*order.lock().unwrap(), ["deleted under the old limits", "change acknowledged"]);
    assert_eq!(topic.retention(&small_segments()).unwrap().ms, 1);
}
