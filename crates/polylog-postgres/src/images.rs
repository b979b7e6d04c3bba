//! The last known image of large rows, on disk (redb), to fill unchanged TOAST columns.
//!
//! Postgres does not send a TOASTed column in an UPDATE that left it unchanged. Only rows larger
//! than Postgres's TOAST threshold (about 2 kB) can have such columns, so only their images are
//! kept: memory stays bounded and small-row tables cost nothing. The store is committed
//! durably only after the log is durable, so after a crash it is never ahead of the log; the
//! replay from the slot brings it up to date.

use std::path::Path;

use redb::{Database, Durability, TableDefinition};

use crate::error::SourceError;
use crate::event::Position;

const IMAGES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("row_images");

/// Rows whose text values add up to less than this cannot have an out-of-line (TOASTed)
/// value: Postgres only moves values out when the row exceeds `TOAST_TUPLE_THRESHOLD` (2032).
/// Text form is usually longer than the stored form, but not always (an `int8[]` of small
/// numbers takes 2 characters per element as text, 8 bytes stored), so the bound is a quarter
/// of the threshold.
pub const TOAST_ROW_BYTES_MIN: usize = 500;
/// Images gathered before they are written to the store.
const PENDING_MAX: usize = 1000;

fn fail(e: impl std::fmt::Display) -> SourceError {
    SourceError::State { path: "row images".into(), reason: e.to_string() }
}

/// Last row images by (topic, key).
pub struct RowImages {
    db: Database,
    /// Writes since the last commit.
    pending: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

fn store_key(topic: &str, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(topic.len() + 1 + key.len());
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(key);
    k
}

impl RowImages {
    pub fn open(path: &Path) -> Result<RowImages, SourceError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(fail)?;
        }
        let db = Database::create(path).map_err(fail)?;
        let tx = db.begin_write().map_err(fail)?;
        tx.open_table(IMAGES).map_err(fail)?;
        tx.commit().map_err(fail)?;
        Ok(RowImages { db, pending: Vec::new() })
    }

    /// The last image stored for a row by a change before `before` (pending writes included).
    pub fn get(
        &self,
        topic: &str,
        key: &[u8],
        before: Position,
    ) -> Result<Option<Vec<u8>>, SourceError> {
        let k = store_key(topic, key);
        let stored = match self.pending.iter().rev().find(|(pk, _)| *pk == k) {
            Some((_, v)) => v.clone(),
            None => {
                let tx = self.db.begin_read().map_err(fail)?;
                let t = tx.open_table(IMAGES).map_err(fail)?;
                t.get(k.as_slice()).map_err(fail)?.map(|v| v.value().to_vec())
            }
        };
        let Some(v) = stored.filter(|v| v.len() >= 20) else { return Ok(None) };
        let (pos, image) = v.split_at(20);
        Ok(Position::from_bytes(pos).filter(|p| *p < before).map(|_| image.to_vec()))
    }

    /// Records a row's image as of the change at `pos` (`None`: the row is gone).
    pub fn set(
        &mut self,
        topic: &str,
        key: &[u8],
        pos: Position,
        image: Option<Vec<u8>>,
    ) -> Result<(), SourceError> {
        let image = image.map(|i| {
            let mut v = pos.to_bytes();
            v.extend_from_slice(&i);
            v
        });
        self.pending.push((store_key(topic, key), image));
        if self.pending.len() >= PENDING_MAX {
            self.commit(false)?;
        }
        Ok(())
    }

    /// Forgets every row of a topic (a TRUNCATE).
    pub fn clear_topic(&mut self, topic: &str) -> Result<(), SourceError> {
        self.commit(false)?;
        let mut start = topic.as_bytes().to_vec();
        start.push(0);
        let mut end = topic.as_bytes().to_vec();
        end.push(1);
        let mut tx = self.db.begin_write().map_err(fail)?;
        tx.set_durability(Durability::None);
        {
            let mut t = tx.open_table(IMAGES).map_err(fail)?;
            t.retain_in(start.as_slice()..end.as_slice(), |_, _| false).map_err(fail)?;
        }
        tx.commit().map_err(fail)
    }

    /// Writes pending images; `durable` makes them survive a crash (call only once the log is
    /// durable up to the same point).
    pub fn commit(&mut self, durable: bool) -> Result<(), SourceError> {
        if self.pending.is_empty() && !durable {
            return Ok(());
        }
        let mut tx = self.db.begin_write().map_err(fail)?;
        tx.set_durability(if durable { Durability::Immediate } else { Durability::None });
        {
            let mut t = tx.open_table(IMAGES).map_err(fail)?;
            for (k, v) in self.pending.drain(..) {
                match v {
                    Some(v) => {
                        t.insert(k.as_slice(), v.as_slice()).map_err(fail)?;
                    }
                    None => {
                        t.remove(k.as_slice()).map_err(fail)?;
                    }
                }
            }
        }
        tx.commit().map_err(fail)
    }
}
