//! The durable outbox: QoS 1 pushes kept on local disk until the broker acknowledged them, so that a
//! device loses nothing across crashes, reboots and long outages.
//!
//! The store is `SQLite` (bundled, through `rusqlite`) in WAL mode: one row per message, in the order
//! they were pushed (`id`), removed once acknowledged. A record is written before `append` returns;
//! the `sync` mode says when it is forced to the disk: `Always` at every append (safe against power
//! loss, slowest), `Batch` (the default) every few milliseconds or every N records from a background
//! thread (a process crash loses nothing; a power loss at most that window), `Never` (left to the
//! operating system). One process at a time: a lock file next to the store names the holder.
//!
//! A damaged store never stops the device: an unreadable file is moved aside, what can be read from
//! it is kept, and the count of what could not be read is reported once. A full disk makes appends
//! fail with `OutboxError::Full`, which the caller reports and works around (the message stays in
//! memory), and pushing goes on.

use rusqlite::{params, Connection, ErrorCode, OpenFlags};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// When appended records are forced to the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// Every few milliseconds or every `sync_records` records, from a background thread.
    #[default]
    Batch,
    /// At every append.
    Always,
    /// When the operating system writes it back.
    Never,
}

impl SyncMode {
    /// `"batch"`, `"always"` or `"never"`.
    pub fn parse(text: &str) -> Option<SyncMode> {
        match text {
            "batch" => Some(SyncMode::Batch),
            "always" => Some(SyncMode::Always),
            "never" => Some(SyncMode::Never),
            _ => None,
        }
    }
}

/// How a durable outbox behaves.
#[derive(Debug, Clone, Copy)]
pub struct OutboxOptions {
    pub sync: SyncMode,
    /// The most payload and topic bytes held; an append beyond it is `OutboxError::Full`.
    pub max_bytes: u64,
    /// Under `SyncMode::Batch`: the longest a record waits to be forced to the disk ...
    pub sync_interval: Duration,
    /// ... and the most records that wait.
    pub sync_records: u64,
}

impl Default for OutboxOptions {
    fn default() -> Self {
        OutboxOptions {
            sync: SyncMode::Batch,
            max_bytes: 1 << 30,
            sync_interval: Duration::from_millis(5),
            sync_records: 1000,
        }
    }
}

/// One message held in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub id: i64,
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    /// When it was appended, in milliseconds since the Unix epoch.
    pub at: i64,
}

const SELECT_RECORDS: &str = "SELECT id, topic, payload, qos, at FROM outbox ORDER BY id";

fn read_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    Ok(Record {
        id: row.get(0)?,
        topic: row.get(1)?,
        payload: row.get(2)?,
        qos: row.get(3)?,
        at: row.get(4)?,
    })
}

/// Why the outbox could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboxError {
    /// Another process holds the outbox.
    Locked { path: PathBuf, holder: String },
    /// The outbox holds `max_bytes` already.
    Full(String),
    /// The disk under the outbox is full.
    DiskFull(String),
    /// The store could not be opened, read or written.
    Store(String),
}

impl std::fmt::Display for OutboxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OutboxError::Locked { path, holder } => write!(
                f,
                "the outbox {} is in use by {holder}: one process per outbox; stop that process, or give \
                 this one an outbox of its own",
                path.display()
            ),
            OutboxError::Full(why) | OutboxError::DiskFull(why) | OutboxError::Store(why) => {
                f.write_str(why)
            }
        }
    }
}

impl std::error::Error for OutboxError {}

/// What opening an existing outbox found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Records found, to be sent before new ones.
    pub records: u64,
    /// Records that could not be read from a damaged store, where it still said how many it held.
    pub lost: u64,
    /// The damaged store could not even say how many records it held.
    pub uncounted: bool,
    /// Where a damaged store was moved to.
    pub moved_to: Option<PathBuf>,
}

/// Counters of an outbox, readable at any time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboxStats {
    pub records: u64,
    pub bytes: u64,
    /// Records sent again after a restart.
    pub replayed: u64,
    /// Records dropped (the `drop_oldest` policy) or lost to damage.
    pub dropped: u64,
    /// Appends that failed (full disk, damaged store): those messages were kept in memory only.
    pub unsaved: u64,
    /// When the oldest record held was appended (ms since the Unix epoch), if any is held.
    pub oldest_at: Option<i64>,
}

struct Inner {
    /// None once released: the connection is closed, which lets another process open the store.
    conn: Option<Connection>,
    /// Appends that failed in a row (a full disk, a damaged store): reported at the first and when
    /// the store works again, not at each.
    failing: u64,
    /// Acknowledged records the store could not remove yet, and whether that was reported.
    unremoved: Vec<i64>,
    removal_failing: bool,
    /// Records committed ever, and how many of them (the first ones) were forced to the disk: a
    /// sync forces what was committed when it began, whichever of two overlapping syncs ends first.
    appended: u64,
    synced: u64,
    /// The size (topic and payload bytes) of each record held, by id.
    sizes: BTreeMap<i64, Held>,
    /// The next record's id: never one this process gave before, so that an acknowledgement of a
    /// dropped record cannot remove a newer one.
    next_id: i64,
}

struct Shared {
    inner: Mutex<Inner>,
    wal: PathBuf,
    options: OutboxOptions,
    records: AtomicU64,
    bytes: AtomicU64,
    dropped: AtomicU64,
    unsaved: AtomicU64,
    replayed: AtomicU64,
    closing: AtomicBool,
    /// Wakes the batch-sync thread.
    due: (Mutex<bool>, Condvar),
}

impl Inner {
    fn conn(&mut self, path: &Path) -> Result<&mut Connection, OutboxError> {
        self.conn.as_mut().ok_or_else(|| {
            OutboxError::Store(format!(
                "the outbox {} was released (its client closed)",
                path.display()
            ))
        })
    }
}

impl Shared {
    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forces what was committed to the disk (the WAL file holds every commit not yet checkpointed),
    /// without holding the store while the disk works: appends go on meanwhile. Returns how many
    /// records still wait (appended during the sync), or None if it failed.
    fn sync(&self, inner: MutexGuard<'_, Inner>) -> Option<u64> {
        let target = inner.appended;
        if target == inner.synced {
            return Some(0);
        }
        drop(inner);
        // Opened for writing: Windows forces a file (FlushFileBuffers) only through a handle that may
        // write, and refuses with "access denied" on a read-only one. Never created here.
        let forced = match OpenOptions::new()
            .write(true)
            .open(&self.wal)
            .and_then(|file| file.sync_data())
        {
            Ok(()) => true,
            // No WAL: everything was checkpointed into the database, which NORMAL forced.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => true,
            Err(err) => {
                log::warn!("forcing the outbox to disk failed (it is tried again): {err}");
                false
            }
        };
        if !forced {
            return None;
        }
        Some(self.forced_up_to(target))
    }

    /// The first `target` records are on disk: returns how many wait still.
    fn forced_up_to(&self, target: u64) -> u64 {
        let mut inner = self.inner();
        inner.synced = inner.synced.max(target);
        inner.appended - inner.synced
    }

    /// Wakes the batch-sync thread.
    fn ring(&self) {
        let (flag, bell) = &self.due;
        *flag.lock().unwrap_or_else(PoisonError::into_inner) = true;
        bell.notify_one();
    }
}

/// A durable outbox on local disk. Cheap to share (`Arc` inside).
pub struct DurableOutbox {
    shared: Arc<Shared>,
    path: PathBuf,
    /// Held open for the lock; released by `release` or when the outbox is dropped.
    lock: Mutex<Option<File>>,
    syncer: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for DurableOutbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableOutbox")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn store_error(path: &Path, what: &str, err: impl std::fmt::Display) -> OutboxError {
    OutboxError::Store(format!("the outbox {}: {what}: {err}", path.display()))
}

fn is_damage(err: &rusqlite::Error) -> bool {
    matches!(
        err.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    )
}

fn is_full(err: &rusqlite::Error) -> bool {
    matches!(err.sqlite_error_code(), Some(ErrorCode::DiskFull))
}

/// Takes the lock file next to the store, writing this process's id into it.
fn lock(path: &Path) -> Result<File, OutboxError> {
    let lock_path = path.with_extension("lock");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(|e| store_error(&lock_path, "cannot open the lock file", e))?;
    if let Err(err) = file.try_lock() {
        if !matches!(err, std::fs::TryLockError::WouldBlock) {
            return Err(store_error(&lock_path, "cannot lock", err));
        }
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let holder = match holder.trim() {
            "" => "another process".to_owned(),
            pid => format!("process {pid}"),
        };
        return Err(OutboxError::Locked {
            path: path.to_owned(),
            holder,
        });
    }
    let _ = file.set_len(0);
    let _ = file.seek(SeekFrom::Start(0));
    let _ = write!(file, "{}", std::process::id());
    let _ = file.sync_data();
    Ok(file)
}

// Ids are given by the outbox (one past the largest ever held in this process), not by
// AUTOINCREMENT, whose bookkeeping table would be a second page written at every commit.
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    at INTEGER NOT NULL -- when it was appended, in ms since the Unix epoch
)";

fn connect(path: &Path, sync: SyncMode) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        // No mutex inside SQLite: the connection is used under the outbox's own lock only.
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    // The lock file keeps other processes out already; exclusive locking spares the file locks and
    // the shared-memory index of every transaction (the WAL index lives in this process's memory).
    conn.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
    // Pages of 2 KiB (for a new store; an existing one keeps its own): a commit writes a page to the
    // WAL, and a 2 KiB page takes about 20% less time per push than SQLite's 4 KiB (make bench)
    // while messages of up to about 1.5 KiB still fit in one.
    conn.pragma_update(None, "page_size", 2048)?;
    // The WAL is folded into the store every 8,000 pages (16 MiB) rather than SQLite's 1,000: each
    // fold forces both files to disk under NORMAL, in the pushing thread. About 5 points of the
    // in-memory rate (make bench: 43% -> 48%); the WAL takes up to 16 MiB of disk beside the store.
    conn.pragma_update(None, "wal_autocheckpoint", 8000)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL forces the WAL at every commit. NORMAL leaves commits to the operating system (a process
    // crash loses nothing) but forces checkpoints, so what Batch forced stays forced when the WAL is
    // folded into the database; Never forces nothing.
    let synchronous = match sync {
        SyncMode::Always => "FULL",
        SyncMode::Batch => "NORMAL",
        SyncMode::Never => "OFF",
    };
    conn.pragma_update(None, "synchronous", synchronous)?;
    // On macOS fsync reaches the drive's cache only; F_FULLFSYNC reaches the medium. SQLite uses it
    // only when asked: for commits under Always, and for the checkpoints Always and Batch both force.
    // Batch's own syncs (`sync`) go through Rust's sync_data, which already uses F_FULLFSYNC there.
    if cfg!(target_vendor = "apple") && sync != SyncMode::Never {
        conn.pragma_update(None, "fullfsync", sync == SyncMode::Always)?;
        conn.pragma_update(None, "checkpoint_fullfsync", true)?;
    }
    conn.execute_batch(SCHEMA)?;
    // A store from before records had a time: they get one (0, read as "when it was opened").
    let has_time = conn
        .prepare("SELECT 1 FROM pragma_table_info('outbox') WHERE name = 'at'")?
        .exists([])?;
    if !has_time {
        conn.execute_batch("ALTER TABLE outbox ADD COLUMN at INTEGER NOT NULL DEFAULT 0")?;
    }
    conn.query_row("PRAGMA quick_check", [], |row| row.get::<_, String>(0))
        .and_then(|verdict| {
            if verdict == "ok" {
                Ok(())
            } else {
                Err(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
                    Some(verdict),
                ))
            }
        })?;
    Ok(conn)
}

/// What the outbox keeps in memory of each record.
#[derive(Debug, Clone, Copy)]
struct Held {
    /// Topic and payload bytes.
    size: u64,
    /// When it was appended, in milliseconds since the Unix epoch.
    at: i64,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The size and time of every record, by id.
fn read_sizes(conn: &Connection) -> rusqlite::Result<BTreeMap<i64, Held>> {
    let opened = now_ms();
    let mut statement =
        conn.prepare("SELECT id, LENGTH(CAST(topic AS BLOB)) + LENGTH(payload), at FROM outbox")?;
    let rows = statement.query_map([], |row| {
        let size: i64 = row.get(1)?;
        let at: i64 = row.get(2)?;
        let held = Held {
            size: u64::try_from(size).unwrap_or(0),
            at: if at == 0 { opened } else { at },
        };
        Ok((row.get::<_, i64>(0)?, held))
    })?;
    rows.collect()
}

/// Deletes the records `ids` (sorted, without duplicates) in one transaction. Acknowledgements come
/// mostly in order: one statement per run of consecutive ids.
fn delete(conn: &mut Connection, ids: &[i64]) -> rusqlite::Result<()> {
    let transaction = conn.transaction()?;
    {
        let mut statement =
            transaction.prepare_cached("DELETE FROM outbox WHERE id BETWEEN ?1 AND ?2")?;
        let mut rest = ids;
        while let Some(&first) = rest.first() {
            let run = rest
                .iter()
                .zip(first..)
                .take_while(|(id, expected)| **id == *expected)
                .count();
            statement.execute(params![first, rest[run - 1]])?;
            rest = &rest[run..];
        }
    }
    transaction.commit()
}

/// Reads what can be read from a damaged store, row by row: the records, and how many were lost
/// (None when the store could not say how many it held).
fn salvage(path: &Path) -> (Vec<Record>, Option<u64>) {
    let Ok(conn) = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return (Vec::new(), None);
    };
    let bounds: Option<(i64, i64)> = conn
        .query_row("SELECT MIN(id), MAX(id) FROM outbox", [], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .ok();
    let mut found = Vec::new();
    if let Ok(mut statement) = conn.prepare(SELECT_RECORDS) {
        if let Ok(rows) = statement.query_map([], read_record) {
            // A damaged page ends the scan: what came before it is kept.
            found.extend(rows.map_while(Result::ok));
        }
    }
    let lost = bounds.map(|(low, high)| {
        u64::try_from(high - low + 1)
            .unwrap_or(0)
            .saturating_sub(found.len() as u64)
    });
    (found, lost)
}

impl DurableOutbox {
    /// Opens (or creates) the outbox at `path`. A store that cannot be read is moved aside and what
    /// could be read from it is kept; the report says how many records there are and how many were lost.
    pub fn open(
        path: &Path,
        options: OutboxOptions,
    ) -> Result<(DurableOutbox, OpenReport), OutboxError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| store_error(path, "cannot create its folder", e))?;
        }
        let lock = lock(path)?;
        let mut report = OpenReport::default();
        let conn = match connect(path, options.sync) {
            Ok(conn) => conn,
            // Only a damaged store is moved aside; any other failure (permissions, a full disk, a
            // read-only file system) is the caller's to see, and the store stays where it is.
            Err(err) if !is_damage(&err) => return Err(store_error(path, "cannot open", err)),
            Err(err) => {
                let (kept, lost) = salvage(path);
                let aside = path.with_extension(format!(
                    "damaged-{}",
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs())
                ));
                for suffix in ["", "-wal", "-shm"] {
                    let from = PathBuf::from(format!("{}{suffix}", path.display()));
                    let to = PathBuf::from(format!("{}{suffix}", aside.display()));
                    if from.exists() {
                        let _ = std::fs::rename(&from, &to);
                    }
                }
                let lost_text = lost.map_or_else(
                    || "the rest could not be counted".to_owned(),
                    |n| format!("{n} lost"),
                );
                log::warn!(
                    "the outbox {} could not be read ({err}): moved to {}; {} record(s) kept, {lost_text}",
                    path.display(),
                    aside.display(),
                    kept.len(),
                );
                let mut conn = connect(path, options.sync)
                    .map_err(|e| store_error(path, "cannot create a new store", e))?;
                // All or nothing: a crash here leaves the records in the store moved aside.
                let refill = |conn: &mut Connection| -> rusqlite::Result<()> {
                    let transaction = conn.transaction()?;
                    for record in &kept {
                        transaction.execute(
                            "INSERT INTO outbox (id, topic, payload, qos, at) VALUES (?1, ?2, ?3, ?4, ?5)",
                            params![record.id, record.topic, record.payload, record.qos, record.at],
                        )?;
                    }
                    transaction.commit()
                };
                refill(&mut conn).map_err(|e| store_error(path, "cannot keep what was read", e))?;
                report.lost = lost.unwrap_or(0);
                report.uncounted = lost.is_none();
                report.moved_to = Some(aside);
                conn
            }
        };
        let sizes =
            read_sizes(&conn).map_err(|e| store_error(path, "cannot count its records", e))?;
        report.records = sizes.len() as u64;
        let bytes: u64 = sizes.values().map(|held| held.size).sum();
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                conn: Some(conn),
                failing: 0,
                unremoved: Vec::new(),
                removal_failing: false,
                appended: 0,
                synced: 0,
                next_id: sizes.keys().next_back().map_or(1, |last| last + 1),
                sizes,
            }),
            wal: PathBuf::from(format!("{}-wal", path.display())),
            options,
            records: AtomicU64::new(report.records),
            bytes: AtomicU64::new(bytes),
            dropped: AtomicU64::new(report.lost),
            unsaved: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            due: (Mutex::new(false), Condvar::new()),
        });
        let syncer = if options.sync == SyncMode::Batch {
            let shared = Arc::clone(&shared);
            Some(
                std::thread::Builder::new()
                    .name("capture-mqtt-outbox-sync".into())
                    .spawn(move || batch_sync(&shared))
                    .map_err(|e| store_error(path, "cannot start its sync thread", e))?,
            )
        } else {
            None
        };
        Ok((
            DurableOutbox {
                shared,
                path: path.to_owned(),
                lock: Mutex::new(Some(lock)),
                syncer,
            },
            report,
        ))
    }

    /// The records held, oldest first (to be sent before anything new).
    pub fn records(&self) -> Result<Vec<Record>, OutboxError> {
        let mut inner = self.shared.inner();
        let mut statement = inner
            .conn(&self.path)?
            .prepare_cached(SELECT_RECORDS)
            .map_err(|e| store_error(&self.path, "cannot read its records", e))?;
        let rows = statement
            .query_map([], read_record)
            .map_err(|e| store_error(&self.path, "cannot read its records", e))?;
        Ok(rows.map_while(Result::ok).collect())
    }

    /// Writes a record; it is in the store when this returns (forced to the disk as `sync` says).
    pub fn append(&self, topic: &str, payload: &[u8], qos: u8) -> Result<i64, OutboxError> {
        let size = (topic.len() + payload.len()) as u64;
        let held = self.shared.bytes.load(Ordering::Acquire);
        if held + size > self.shared.options.max_bytes {
            return Err(OutboxError::Full(format!(
                "the outbox {} holds {held} bytes, and this message of {size} would pass outbox_max_bytes={}",
                self.path.display(),
                self.shared.options.max_bytes
            )));
        }
        let mut inner = self.shared.inner();
        let id = inner.next_id;
        let at = now_ms();
        let result = inner.conn(&self.path).and_then(|conn| {
            conn.prepare_cached(
                "INSERT INTO outbox (id, topic, payload, qos, at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut statement| statement.execute(params![id, topic, payload, qos, at]))
            .map_err(|err| {
                if is_full(&err) {
                    OutboxError::DiskFull(format!(
                        "the disk of the outbox {} is full: {err}",
                        self.path.display()
                    ))
                } else {
                    store_error(&self.path, "cannot write", err)
                }
            })
        });
        if let Err(err) = result {
            self.shared.unsaved.fetch_add(1, Ordering::Relaxed);
            if inner.failing == 0 {
                log::warn!(
                    "{err}: QoS 1 pushes are kept in memory only until the broker acknowledges them \
                     (a process that ends before loses them); the outbox is tried again at each push, \
                     and its stats count them as unsaved"
                );
            }
            inner.failing += 1;
            return Err(err);
        }
        if !inner.unremoved.is_empty() {
            let _ = self.remove_held(&mut inner, &[]); // reported inside
        }
        if inner.failing > 0 {
            log::warn!(
                "the outbox {} stores again; {} push(es) before this one were kept in memory only",
                self.path.display(),
                inner.failing
            );
            inner.failing = 0;
        }
        self.shared.records.fetch_add(1, Ordering::Relaxed);
        self.shared.bytes.fetch_add(size, Ordering::Release);
        inner.sizes.insert(id, Held { size, at });
        inner.next_id = id + 1;
        inner.appended += 1;
        let waiting = inner.appended - inner.synced;
        match self.shared.options.sync {
            SyncMode::Always => inner.synced = inner.appended, // synchronous=FULL forced it
            SyncMode::Batch if waiting >= self.shared.options.sync_records => {
                // Whatever came during this sync (or all, if it failed) is the thread's to force.
                if self.shared.sync(inner) != Some(0) {
                    self.shared.ring();
                }
            }
            SyncMode::Batch if waiting == 1 => self.shared.ring(),
            SyncMode::Batch | SyncMode::Never => {}
        }
        Ok(id)
    }

    /// Removes acknowledged records (ids it does not hold are ignored). When the store cannot (a
    /// full disk), they are kept and removed with the next call or append; until then a restart would
    /// send them again. Reported once, and once when it removes again.
    pub fn remove(&self, ids: &[i64]) -> Result<(), OutboxError> {
        let mut inner = self.shared.inner();
        self.remove_held(&mut inner, ids)
    }

    fn remove_held(&self, inner: &mut Inner, ids: &[i64]) -> Result<(), OutboxError> {
        let mut held = std::mem::take(&mut inner.unremoved);
        held.extend(
            ids.iter()
                .copied()
                .filter(|id| inner.sizes.contains_key(id)),
        );
        if held.is_empty() {
            return Ok(());
        }
        held.sort_unstable();
        held.dedup();
        if let Err(err) = delete(inner.conn(&self.path)?, &held) {
            let err = store_error(&self.path, "cannot remove acknowledged records", err);
            if !inner.removal_failing {
                log::warn!(
                    "{err}: {} record(s) stay in the store and are removed at the next chance; \
                     a restart before would send them again (duplicates, as QoS 1 allows)",
                    held.len()
                );
                inner.removal_failing = true;
            }
            inner.unremoved = held;
            return Err(err);
        }
        if inner.removal_failing {
            log::warn!(
                "the outbox {} removes acknowledged records again",
                self.path.display()
            );
            inner.removal_failing = false;
        }
        let freed: u64 = held
            .iter()
            .filter_map(|id| inner.sizes.remove(id))
            .map(|record| record.size)
            .sum();
        self.shared
            .records
            .fetch_sub(held.len() as u64, Ordering::Relaxed);
        self.shared.bytes.fetch_sub(freed, Ordering::Release);
        Ok(())
    }

    /// Drops the oldest record (the `drop_oldest` policy): its id, or None when the outbox is empty.
    pub fn drop_oldest(&self) -> Result<Option<i64>, OutboxError> {
        // Chosen and removed under one lock: an acknowledgement cannot remove it in between.
        let mut inner = self.shared.inner();
        let Some(id) = inner.sizes.keys().next().copied() else {
            return Ok(None);
        };
        self.remove_held(&mut inner, &[id])?;
        self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        Ok(Some(id))
    }

    /// Counts a record sent again after a restart.
    pub fn note_replayed(&self, count: u64) {
        self.shared.replayed.fetch_add(count, Ordering::Relaxed);
    }

    /// Forces everything appended so far to the disk.
    pub fn flush(&self) {
        // Records appended while it synced are forced too; a failing disk is not waited on.
        while let Some(1..) = self.shared.sync(self.shared.inner()) {}
    }

    pub fn stats(&self) -> OutboxStats {
        OutboxStats {
            records: self.shared.records.load(Ordering::Relaxed),
            bytes: self.shared.bytes.load(Ordering::Relaxed),
            replayed: self.shared.replayed.load(Ordering::Relaxed),
            dropped: self.shared.dropped.load(Ordering::Relaxed),
            unsaved: self.shared.unsaved.load(Ordering::Relaxed),
            oldest_at: self
                .shared
                .inner()
                .sizes
                .values()
                .next()
                .map(|held| held.at),
        }
    }

    /// The most topic and payload bytes it holds.
    pub fn max_bytes(&self) -> u64 {
        self.shared.options.max_bytes
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Forces what was appended to the disk and lets another process open the outbox (the client
    /// closed). Records stay in the store for the next process.
    pub fn release(&self) {
        self.flush();
        // Closing the connection ends SQLite's exclusive lock (and folds the WAL into the store).
        drop(self.shared.inner().conn.take());
        if let Some(lock) = self
            .lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = lock.unlock();
        }
    }
}

impl Drop for DurableOutbox {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Release);
        self.shared.ring();
        if let Some(syncer) = self.syncer.take() {
            let _ = syncer.join();
        }
        self.flush();
    }
}

/// The `Batch` mode's thread: forces the store to disk within `sync_interval` of the first record
/// that waits for it.
fn batch_sync(shared: &Shared) {
    let (flag, bell) = &shared.due;
    loop {
        {
            let mut due = flag.lock().unwrap_or_else(PoisonError::into_inner);
            while !*due {
                due = bell.wait(due).unwrap_or_else(PoisonError::into_inner);
            }
            *due = false;
        }
        if shared.closing.load(Ordering::Acquire) {
            return;
        }
        loop {
            // The interval, cut short when the outbox closes (its drop forces what is left).
            let deadline = std::time::Instant::now() + shared.options.sync_interval;
            let mut due = flag.lock().unwrap_or_else(PoisonError::into_inner);
            while !shared.closing.load(Ordering::Acquire) {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                due = bell
                    .wait_timeout(due, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            drop(due);
            // Records appended during the sync did not ring: they are forced in the next round.
            let waiting = shared.sync(shared.inner());
            if waiting.is_none_or(|n| n == 0) || shared.closing.load(Ordering::Acquire) {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics(outbox: &DurableOutbox) -> Vec<String> {
        outbox
            .records()
            .unwrap()
            .into_iter()
            .map(|r| r.topic)
            .collect()
    }

    /// Makes the store refuse writes (as a full disk would), or take them again.
    fn refuse_writes(outbox: &DurableOutbox, refuse: bool) {
        let pragma = format!("PRAGMA query_only = {}", if refuse { "ON" } else { "OFF" });
        let path = outbox.path().to_owned();
        outbox
            .shared
            .inner()
            .conn(&path)
            .unwrap()
            .execute_batch(&pragma)
            .unwrap();
    }

    fn folder(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("capture-mqtt-outbox-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn records_survive_a_reopen_in_order_until_removed() {
        let path = folder("reopen").join("outbox.db");
        {
            let (outbox, report) = DurableOutbox::open(&path, OutboxOptions::default()).unwrap();
            assert_eq!(report, OpenReport::default());
            let ids: Vec<i64> = (0..5)
                .map(|i| outbox.append(&format!("t/{i}"), b"{}", 1).unwrap())
                .collect();
            outbox.remove(&ids[..2]).unwrap();
            assert_eq!(outbox.stats().records, 3);
            assert_eq!(outbox.stats().bytes, 3 * 5);
        }
        let (outbox, report) = DurableOutbox::open(&path, OutboxOptions::default()).unwrap();
        assert_eq!(report.records, 3);
        // The oldest record's time survives the reopen.
        let oldest = outbox.stats().oldest_at.unwrap();
        assert!(oldest <= now_ms() && oldest > now_ms() - 60_000, "{oldest}");
        let topics = topics(&outbox);
        assert_eq!(topics, ["t/2", "t/3", "t/4"]);
        let next = outbox.append("t/5", b"{}", 1).unwrap();
        assert!(next > outbox.records().unwrap()[2].id, "ids keep growing");
    }

    #[test]
    fn removal_takes_runs_and_scattered_ids_and_ignores_unknown_ones() {
        let path = folder("runs").join("outbox.db");
        let (outbox, _) = DurableOutbox::open(&path, OutboxOptions::default()).unwrap();
        let ids: Vec<i64> = (0..10)
            .map(|i| outbox.append(&format!("t/{i}"), b"{}", 1).unwrap())
            .collect();
        outbox
            .remove(&[ids[3], ids[0], ids[1], ids[2], ids[6], ids[8], ids[8], 999])
            .unwrap();
        let left: Vec<i64> = outbox.records().unwrap().iter().map(|r| r.id).collect();
        assert_eq!(left, [ids[4], ids[5], ids[7], ids[9]]);
        assert_eq!(outbox.stats().records, 4);
        assert_eq!(outbox.stats().bytes, 4 * 5);
    }

    #[test]
    fn an_acknowledgement_of_a_dropped_record_leaves_newer_ones() {
        let path = folder("reuse").join("outbox.db");
        let (outbox, _) = DurableOutbox::open(&path, OutboxOptions::default()).unwrap();
        let first = outbox.append("t/old", b"{}", 1).unwrap();
        assert_eq!(outbox.drop_oldest().unwrap(), Some(first));
        let second = outbox.append("t/new", b"{}", 1).unwrap();
        assert_ne!(first, second, "an id is never given twice");
        // The dropped message was in flight; its acknowledgement arrives now.
        outbox.remove(&[first]).unwrap();
        assert_eq!(outbox.records().unwrap()[0].topic, "t/new");
        outbox.remove(&[second]).unwrap();
        assert_eq!(
            outbox.stats().oldest_at,
            None,
            "an empty outbox has no oldest record"
        );
    }

    #[test]
    fn a_removal_that_failed_is_retried() {
        let path = folder("retry").join("outbox.db");
        let (outbox, _) = DurableOutbox::open(&path, OutboxOptions::default()).unwrap();
        let first = outbox.append("t/0", b"{}", 1).unwrap();
        // The store refuses writes for a moment (as a full disk would).
        refuse_writes(&outbox, true);
        assert!(outbox.remove(&[first]).is_err());
        assert_eq!(outbox.stats().records, 1, "kept until it can be removed");
        refuse_writes(&outbox, false);
        // The next append removes it on the way.
        outbox.append("t/1", b"{}", 1).unwrap();
        let topics = topics(&outbox);
        assert_eq!(topics, ["t/1"]);
        assert_eq!(outbox.stats().records, 1);
    }

    #[test]
    fn a_store_without_record_times_is_brought_up_to_date() {
        let path = folder("old").join("outbox.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, \
                 payload BLOB NOT NULL, qos INTEGER NOT NULL);
                 INSERT INTO outbox (topic, payload, qos) VALUES ('t/0', X'7B7D', 1);",
            )
            .unwrap();
        }
        let (outbox, report) = DurableOutbox::open(&path, OutboxOptions::default()).unwrap();
        assert_eq!(report.records, 1);
        assert!(outbox.stats().oldest_at.unwrap() > now_ms() - 60_000);
        outbox.append("t/1", b"{}", 1).unwrap();
        let topics = topics(&outbox);
        assert_eq!(topics, ["t/0", "t/1"]);
    }

    #[test]
    fn overlapping_syncs_leave_later_records_waiting() {
        let path = folder("overlap").join("outbox.db");
        let options = OutboxOptions {
            sync_interval: Duration::from_secs(3600), // the thread stays out of it
            ..OutboxOptions::default()
        };
        let (outbox, _) = DurableOutbox::open(&path, options).unwrap();
        for i in 0..3 {
            outbox.append(&format!("t/{i}"), b"{}", 1).unwrap();
        }
        // A slow sync began with 3 records; a quicker one forced 5, then one more came.
        for i in 3..5 {
            outbox.append(&format!("t/{i}"), b"{}", 1).unwrap();
        }
        assert_eq!(outbox.shared.forced_up_to(5), 0);
        outbox.append("t/5", b"{}", 1).unwrap();
        // The slow one ends last: the sixth record still waits for a sync.
        assert_eq!(outbox.shared.forced_up_to(3), 1);
        assert_eq!(outbox.shared.sync(outbox.shared.inner()), Some(0));
    }

    #[test]
    fn bytes_are_counted_in_bytes_whatever_the_topic_holds() {
        let path = folder("utf8").join("outbox.db");
        {
            let (outbox, _) = DurableOutbox::open(&path, OutboxOptions::default()).unwrap();
            let id = outbox
                .append("v1/sources/s/data/read/Zürich/Maß", b"{}", 1)
                .unwrap();
            outbox.append("t", b"{}", 1).unwrap();
            outbox.remove(&[id]).unwrap();
            assert_eq!(outbox.stats().bytes, 3);
        }
        let (outbox, _) = DurableOutbox::open(&path, OutboxOptions::default()).unwrap();
        assert_eq!(outbox.stats().bytes, 3);
    }

    #[test]
    fn a_second_process_gets_an_error_naming_the_holder() {
        let path = folder("lock").join("outbox.db");
        let (_first, _) = DurableOutbox::open(&path, OutboxOptions::default()).unwrap();
        let err = DurableOutbox::open(&path, OutboxOptions::default()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&format!("process {}", std::process::id())),
            "{text}"
        );
        assert!(text.contains("one process per outbox"), "{text}");
    }

    #[test]
    fn max_bytes_bounds_the_outbox() {
        let path = folder("bytes").join("outbox.db");
        let options = OutboxOptions {
            max_bytes: 100,
            ..OutboxOptions::default()
        };
        let (outbox, _) = DurableOutbox::open(&path, options).unwrap();
        for _ in 0..9 {
            outbox.append("topic", b"12345", 1).unwrap(); // 10 bytes each
        }
        outbox.append("topic", b"12345", 1).unwrap();
        let err = outbox.append("topic", b"12345", 1).unwrap_err();
        assert!(matches!(err, OutboxError::Full(_)), "{err}");
        assert!(err.to_string().contains("max_bytes=100"));
        assert_eq!(outbox.drop_oldest().unwrap(), Some(1));
        outbox.append("topic", b"12345", 1).unwrap();
        assert_eq!(outbox.stats().dropped, 1);
    }

    #[test]
    fn a_truncated_store_is_moved_aside_and_what_is_readable_is_kept() {
        let dir = folder("truncated");
        let path = dir.join("outbox.db");
        {
            let options = OutboxOptions {
                sync: SyncMode::Always,
                ..OutboxOptions::default()
            };
            let (outbox, _) = DurableOutbox::open(&path, options).unwrap();
            let big = vec![b'x'; 3000];
            for i in 0..200 {
                outbox.append(&format!("t/{i}"), &big, 1).unwrap();
            }
            // Checkpoint into the main file, so that truncating it loses data.
            outbox
                .shared
                .inner()
                .conn(&path)
                .unwrap()
                .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
                .unwrap();
        }
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        let length = file.metadata().unwrap().len();
        file.set_len(length / 2).unwrap();
        drop(file);
        let (outbox, report) = DurableOutbox::open(&path, OutboxOptions::default()).unwrap();
        assert!(report.moved_to.is_some(), "{report:?}");
        assert!(
            report.records + report.lost >= 1 || report.uncounted,
            "{report:?}"
        );
        // It goes on: new records are taken.
        outbox.append("t/new", b"{}", 1).unwrap();
        assert_eq!(outbox.records().unwrap().last().unwrap().topic, "t/new");
    }

    #[test]
    fn garbage_instead_of_a_store_never_stops_the_device() {
        let dir = folder("garbage");
        let path = dir.join("outbox.db");
        std::fs::write(&path, b"this is not a database, someone wrote over it").unwrap();
        let (outbox, report) = DurableOutbox::open(&path, OutboxOptions::default()).unwrap();
        assert_eq!(report.records, 0);
        assert!(report.moved_to.is_some());
        outbox.append("t", b"{}", 1).unwrap();
        assert_eq!(outbox.stats().records, 1);
    }

    #[test]
    fn every_sync_mode_keeps_what_was_appended() {
        for (i, sync) in [SyncMode::Batch, SyncMode::Always, SyncMode::Never]
            .into_iter()
            .enumerate()
        {
            let path = folder(&format!("sync{i}")).join("outbox.db");
            {
                let options = OutboxOptions {
                    sync,
                    ..OutboxOptions::default()
                };
                let (outbox, _) = DurableOutbox::open(&path, options).unwrap();
                for n in 0..100 {
                    outbox.append(&format!("t/{n}"), b"{}", 1).unwrap();
                }
            }
            let (outbox, report) = DurableOutbox::open(&path, OutboxOptions::default()).unwrap();
            assert_eq!(report.records, 100, "{sync:?}");
            assert_eq!(outbox.records().unwrap().len(), 100);
        }
    }
}
