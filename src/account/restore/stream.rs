//! Reading a backup download as it arrives: the spool file is parsed while the download
//! writes it, so the token starts on the first sessions long before the last byte.
//!
//! The download writes the spool at the network's pace and never waits for the token (a
//! stalled socket would be cut off by the server, and a YubiKey takes most of an hour for a
//! large backup). The parser follows the file on disk, reading only what was written, and
//! hands sessions on one by one. When the download is cut off and tried again, the new
//! attempt starts a new file and the parser starts over on it; sessions it had handed on
//! already come again, and the restore skips them by their IDs.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use serde::de::{DeserializeSeed, Error as _, IgnoredAny, MapAccess, Visitor};

use super::DumpSession;
use crate::files::PrivateFile;
use crate::homeserver::BackupSink;
use crate::matrix::backup::BackedUpSession;

/// What the handler of each session says: go on, or stop the parse.
pub type Each<'a> = dyn FnMut(BackedUpSession) -> Result<(), String> + 'a;

/// Parses a backup download (`{"rooms": {room: {"sessions": {id: KeyBackupData}}}}`)
/// from `reader`, handing each session to `each` in the order of the file. Nothing but
/// the session being handed on is held in memory. Unknown fields are skipped; `rooms`
/// missing means no sessions.
pub fn stream_backup(reader: impl Read, each: &mut Each<'_>) -> Result<(), serde_json::Error> {
    let mut de =
        serde_json::Deserializer::from_reader(std::io::BufReader::with_capacity(64 << 10, reader));
    Keyed {
        field: "rooms",
        inner: Rooms(each),
    }
    .deserialize(&mut de)?;
    de.end()
}

/// A JSON object of which one field is parsed by `inner` and the rest skipped.
struct Keyed<T> {
    field: &'static str,
    inner: T,
}

impl<'de, T: DeserializeSeed<'de, Value = ()>> DeserializeSeed<'de> for Keyed<T> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, T: DeserializeSeed<'de, Value = ()>> Visitor<'de> for Keyed<T> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "an object with {:?}", self.field)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut inner = Some(self.inner);
        while let Some(key) = map.next_key::<String>()? {
            match (key == self.field, inner.take()) {
                (true, Some(seed)) => map.next_value_seed(seed)?,
                (true, None) => {
                    return Err(A::Error::custom(format!("{:?} appears twice", self.field)));
                }
                (false, seed) => {
                    inner = seed;
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// `rooms`: room ID → `{"sessions": …}`.
struct Rooms<'a, 'b>(&'a mut Each<'b>);

impl<'de> DeserializeSeed<'de> for Rooms<'_, '_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Rooms<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object of rooms")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(room_id) = map.next_key::<String>()? {
            map.next_value_seed(Keyed {
                field: "sessions",
                inner: Sessions {
                    room_id: &room_id,
                    each: &mut *self.0,
                },
            })?;
        }
        Ok(())
    }
}

/// One room's `sessions`: session ID → `KeyBackupData`.
pub(super) struct Sessions<'a, 'b> {
    pub(super) room_id: &'a str,
    pub(super) each: &'a mut Each<'b>,
}

impl<'de> DeserializeSeed<'de> for Sessions<'_, '_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Sessions<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object of sessions")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(session_id) = map.next_key::<String>()? {
            let s: DumpSession = map.next_value()?;
            (self.each)(BackedUpSession {
                room_id: self.room_id.to_string(),
                session_id,
                session_data: s.session_data,
            })
            .map_err(A::Error::custom)?;
        }
        Ok(())
    }
}

/// How the download stands, shared by the download (writer) and the parser (reader).
#[derive(Default)]
pub struct Spool {
    state: Mutex<SpoolState>,
    changed: Condvar,
    /// The parser gave up (the server's JSON is bad): the download stops too.
    cancelled: AtomicBool,
}

#[derive(Default)]
struct SpoolState {
    /// Attempts started; each one writes a new file.
    attempt: u64,
    /// The current attempt's file, to read from.
    file: Option<Arc<File>>,
    /// Bytes of it written and flushed.
    written: u64,
    /// The current attempt arrived whole.
    complete: bool,
    /// The download is over (whole, or given up): no attempt follows.
    over: bool,
}

impl Spool {
    pub fn new() -> Arc<Spool> {
        Arc::new(Spool::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SpoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts an attempt writing `file` (the spool's new version).
    pub fn begin(self: &Arc<Self>, file: PrivateFile) -> std::io::Result<Tee> {
        let reader = Arc::new(file.reader()?);
        let mut st = self.lock();
        st.attempt += 1;
        st.file = Some(reader);
        st.written = 0;
        st.complete = false;
        let attempt = st.attempt;
        drop(st);
        self.changed.notify_all();
        Ok(Tee {
            spool: self.clone(),
            file,
            attempt,
        })
    }

    /// The download is over: no attempt follows.
    pub fn end(&self) {
        self.lock().over = true;
        self.changed.notify_all();
    }

    /// The parser gave up: the download stops at its next write.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
    }

    pub fn cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Parses every attempt as it is written, until one arrives whole and parses, or the
    /// download is over. `Ok(false)`: the download ended without a whole attempt (its own
    /// error says why). A JSON error in a whole attempt is the server's, and returned.
    pub fn follow(&self, each: &mut Each<'_>) -> Result<bool, serde_json::Error> {
        let mut seen = 0;
        loop {
            let (attempt, file) = {
                let mut st = self.lock();
                while st.attempt == seen && !st.over {
                    st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                if st.attempt == seen {
                    return Ok(false);
                }
                match &st.file {
                    Some(f) => (st.attempt, f.clone()),
                    None => return Ok(false),
                }
            };
            seen = attempt;
            let reader = Follow {
                spool: self,
                attempt,
                file,
                offset: 0,
            };
            match stream_backup(reader, each) {
                Ok(()) => return Ok(true),
                // Cut off: the next attempt starts again.
                Err(e) if e.is_io() => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// The writing end of one attempt: the spool file, announcing every write to the parser.
pub struct Tee {
    spool: Arc<Spool>,
    file: PrivateFile,
    attempt: u64,
}

impl std::io::Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.spool.cancelled.load(Ordering::Acquire) {
            return Err(std::io::Error::other(
                "the restore stopped reading the backup",
            ));
        }
        self.file.write_all(buf)?;
        self.file.flush()?;
        let mut st = self.spool.lock();
        if st.attempt == self.attempt {
            st.written += buf.len() as u64;
        }
        drop(st);
        self.spool.changed.notify_all();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl BackupSink for Tee {
    fn finish(self: Box<Self>) -> std::io::Result<()> {
        let Tee {
            spool,
            file,
            attempt,
        } = *self;
        file.commit_replace()?;
        let mut st = spool.lock();
        if st.attempt == attempt {
            st.complete = true;
        }
        drop(st);
        spool.changed.notify_all();
        Ok(())
    }
}

/// Reads one attempt's file up to what was written, waiting for more until the attempt
/// is whole; an attempt replaced by a new one, or a download given up, is an I/O error.
struct Follow<'a> {
    spool: &'a Spool,
    attempt: u64,
    file: Arc<File>,
    offset: u64,
}

impl Read for Follow<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut st = self.spool.lock();
        loop {
            if st.attempt != self.attempt {
                return Err(std::io::Error::other("the download started again"));
            }
            if self.offset < st.written {
                let n = buf.len().min((st.written - self.offset) as usize);
                drop(st);
                let n = self.file.read_at(&mut buf[..n], self.offset)?;
                if n == 0 {
                    return Err(std::io::Error::other(
                        "the spool file is shorter than written",
                    ));
                }
                self.offset += n as u64;
                return Ok(n);
            }
            if st.complete {
                return Ok(0);
            }
            if st.over {
                return Err(std::io::Error::other("the download was given up"));
            }
            st = self
                .spool
                .changed
                .wait(st)
                .unwrap_or_else(|e| e.into_inner());
        }
    }
}
