//! Compaction of compacted topics, as Kafka's log cleaner does it.
//!
//! A pass builds a map from key hash to latest offset over the *dirty* part of the sealed
//! segments (offsets not yet cleaned), bounded to `compaction_keys_max` entries; it then rewrites
//! every sealed segment up to the end of what the map covers, keeping a record only if no later
//! record with its key is in the map. Tombstones in segments last written more than the topic's
//! `tombstone_retention_ms` ago are dropped too (the segment's age, not the record's timestamp,
//! which a producer sets). A segment with nothing to remove is left as it is. Offsets never change: a rewritten batch keeps its
//! base offset and last offset delta. The active segment is never touched, so appends go on, and
//! readers keep reading the files they opened (a replaced file lives on until closed).
//!
//! Crash safety: each cleaned segment is written to `<base>.log.cleaned`, fsynced, then renamed
//! over the original; segments are replaced oldest first, so a tombstone is only dropped after
//! every older record of its key is gone from the files (a crash never resurrects a deleted
//! key). Leftover `.cleaned` files are removed on open.

use std::collections::HashMap;
use std::fs::File;
use std::hash::{Hash, Hasher};
use std::io::Write;

use crate::format::{self, RecordIter, BATCH_HEADER_BYTES};
use crate::index::IndexBuilder;
use crate::partition::{sync_dir, Partition};
use crate::segment::{log_path, BatchCursor, ReadStop, SegmentMeta};
use crate::{LogError, Result};

/// What one compaction pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CompactionStats {
    pub segments_rewritten: usize,
    pub records_removed: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

/// 128 bits of hash: collisions (which would drop a live key) are negligible at any key count.
fn key_hash(key: &[u8]) -> u128 {
    let mut a = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut a);
    let mut b = std::collections::hash_map::DefaultHasher::new();
    0x9e37_79b9_7f4a_7c15_u64.hash(&mut b);
    key.hash(&mut b);
    (u128::from(a.finish()) << 64) | u128::from(b.finish())
}

/// Whether a partition has enough uncleaned data to be worth a pass.
pub(crate) fn needs_compaction(p: &Partition, min_dirty_ratio: f64) -> bool {
    let (sealed, first_dirty) = p.sealed_segments();
    let total: u64 = sealed.iter().map(|s| s.size).sum();
    let dirty: u64 = sealed.iter().filter(|s| s.next_offset > first_dirty).map(|s| s.size).sum();
    total > 0 && dirty as f64 >= min_dirty_ratio * total as f64
}

/// Compacts a partition's sealed segments completely, in as many passes as the key map's bound
/// requires.
/// With `force`, a pass runs even when nothing is dirty, to drop tombstones whose grace has run
/// out since the last pass (the background round waits for new data to clean, as Kafka does).
pub(crate) fn compact(p: &Partition, now_ms: i64, force: bool) -> Result<CompactionStats> {
    let _one_at_a_time = p.compaction.lock().unwrap_or_else(|e| e.into_inner());
    let mut total = CompactionStats::default();
    let mut first = true;
    while let Some(s) = compact_pass(p, now_ms, force && first)? {
        first = false;
        total.segments_rewritten += s.segments_rewritten;
        total.records_removed += s.records_removed;
        total.bytes_before += s.bytes_before;
        total.bytes_after += s.bytes_after;
    }
    Ok(total)
}

/// One pass; `None` when there is nothing dirty left (and no clean-only pass was asked for).
fn compact_pass(p: &Partition, now_ms: i64, clean_only: bool) -> Result<Option<CompactionStats>> {
    let (sealed, first_dirty) = p.sealed_segments();
    let mut stats = CompactionStats::default();
    let Some(last) = sealed.last() else { return Ok(None) };
    if last.next_offset <= first_dirty && !clean_only {
        return Ok(None);
    }
    let durable = p.opts.fsyncs();
    // 1. Map key → latest offset over the dirty range, as far as the map's bound allows.
    let cap = p.opts.compaction_keys_max.max(1);
    let mut map: HashMap<u128, u64> = HashMap::new();
    let mut map_end = first_dirty;
    'segments: for seg in sealed.iter().filter(|s| s.next_offset > first_dirty) {
        let complete = for_each_batch(p, seg, |_, h, body| {
            let mut it = RecordIter::new(h, body);
            while let Some(r) = it.next_raw() {
                let r = r.map_err(|e| format!("{e:?}"))?;
                if r.offset < first_dirty {
                    continue;
                }
                let k = key_hash(r.key.unwrap_or_default());
                if map.len() >= cap && !map.contains_key(&k) {
                    map_end = r.offset;
                    return Ok(false);
                }
                map.insert(k, r.offset);
            }
            Ok(true)
        })?;
        if !complete {
            break 'segments;
        }
        map_end = seg.next_offset;
    }
    // 2. Rewrite every sealed segment that holds offsets the map covers, oldest first.
    let grace = i64::try_from(p.config.tombstone_retention_ms).unwrap_or(i64::MAX);
    let tombstone_horizon = now_ms.saturating_sub(grace);
    for seg in sealed.iter().filter(|s| s.base < map_end) {
        let path = log_path(&p.dir, seg.base);
        // A tombstone's grace runs from when its segment was last written (as Kafka does), not
        // from the record's own timestamp, which a producer sets and may be old (a backfill).
        // Rewrites keep the original modification time.
        let modified = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .map_err(LogError::io("reading a segment's modification time", &path))?;
        let modified_ms =
            modified.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let tombstones_expired = modified_ms < tombstone_horizon;
        let tmp = path.with_extension("log.cleaned");
        let mut out = std::io::BufWriter::new(
            File::create(&tmp).map_err(LogError::io("creating a compacted segment", &tmp))?,
        );
        let mut meta = SegmentMeta { size: 0, max_timestamp: i64::MIN, ..*seg };
        let mut index = IndexBuilder::new();
        let mut buf = Vec::new();
        let mut removed = 0u64;
        let mut write_err = None;
        for_each_batch(p, seg, |_, h, body| {
            let mut keep = Vec::new();
            let mut it = RecordIter::new(h, body);
            while let Some(r) = it.next_raw() {
                let r = r.map_err(|e| format!("{e:?}"))?;
                let superseded = r.offset < map_end
                    && map.get(&key_hash(r.key.unwrap_or_default())).is_some_and(|&l| l > r.offset);
                let expired_tombstone =
                    tombstones_expired && r.offset < map_end && r.value.is_none();
                if superseded || expired_tombstone {
                    removed += 1;
                } else {
                    keep.push(r);
                }
            }
            if keep.is_empty() {
                return Ok(true);
            }
            let recs: Vec<_> =
                keep.iter().map(|r| (r.offset, r.timestamp, r.to_record())).collect();
            buf.clear();
            let items = recs.iter().map(|(o, ts, r)| ((o - h.base_offset) as u32, *ts, r));
            let encoded = format::encode_batch(&mut buf, h.base_offset, h.last_offset_delta, items);
            let (len, max_ts) = (encoded.len, encoded.max_timestamp);
            let rel = (h.base_offset - seg.base) as u32;
            index.on_batch(rel, meta.size as u32, len as u64, max_ts, p.opts.index_interval_bytes);
            meta.size += len as u64;
            meta.max_timestamp = meta.max_timestamp.max(max_ts);
            if let Err(e) = out.write_all(&buf) {
                write_err = Some(e);
                return Ok(false);
            }
            Ok(true)
        })?;
        let flushed = match write_err {
            Some(e) => Err(e),
            None => out.into_inner().map_err(|e| e.into_error()).and_then(|f| {
                f.set_modified(modified)?;
                if durable {
                    f.sync_all()
                } else {
                    Ok(())
                }
            }),
        };
        flushed.map_err(LogError::io("writing a compacted segment", &tmp))?;
        if removed == 0 {
            // Nothing to remove here: keep the original (and its index) as it is.
            let _ = std::fs::remove_file(&tmp);
            continue;
        }
        stats.segments_rewritten += 1;
        stats.records_removed += removed;
        stats.bytes_before += seg.size;
        stats.bytes_after += meta.size;
        if meta.size == 0 {
            let _ = std::fs::remove_file(&tmp);
            p.swap_compacted(seg.base, None)?;
        } else {
            p.swap_compacted(seg.base, Some((meta, &tmp, &index)))?;
        }
    }
    if durable {
        sync_dir(&p.dir).map_err(LogError::io("syncing the partition directory", &p.dir))?;
    }
    p.set_first_dirty(map_end)?;
    Ok(Some(stats))
}

/// Calls `f(pos, header, records)` for each batch of a sealed segment until it returns false;
/// returns whether every batch was visited.
fn for_each_batch(
    p: &Partition,
    seg: &SegmentMeta,
    mut f: impl FnMut(u64, format::BatchHeader, &[u8]) -> std::result::Result<bool, String>,
) -> Result<bool> {
    let path = log_path(&p.dir, seg.base);
    let file = File::open(&path).map_err(LogError::io("opening a segment to compact", &path))?;
    let mut cur = BatchCursor::new(file, 0, p.opts.batch_bytes_max);
    loop {
        let pos = cur.pos;
        let corrupt =
            |reason: String| LogError::Corrupt { path: path.clone(), position: pos, reason };
        match cur.next_batch(seg.size) {
            Ok(None) => return Ok(true),
            Ok(Some((h, bytes))) => {
                if !f(pos, h, &bytes[BATCH_HEADER_BYTES..]).map_err(corrupt)? {
                    return Ok(false);
                }
            }
            Err(ReadStop::Io(e)) => {
                return Err(LogError::io("reading a segment to compact", &path)(e))
            }
            Err(ReadStop::Torn { .. }) => return Err(corrupt("sealed segment ends early".into())),
            Err(ReadStop::Corrupt { reason, .. }) => return Err(corrupt(reason)),
        }
    }
}
