//! `synq-reflector persisted export|import`: back up and restore the persisted data of a session
//! name. The document is decrypted (or encrypted) here, locally, with the session password.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use synq_protocol::crypto::{Binding, KdfParams, SealKind, SessionKey};
use synq_protocol::ids::{AppId, IdOptions, PersistentId, SessionName, sha256};
use synq_protocol::wire::PersistRecord;
use synq_reflector::storage::{DiskStorage, Storage};

/// What to do with persisted data.
#[derive(Subcommand, Debug)]
pub enum Action {
    /// Print the persisted document (canonical JSON) of a session name.
    Export(Target),
    /// Replace the persisted document of a session name with the JSON in FILE ("-" for stdin).
    Import {
        #[command(flatten)]
        target: Target,
        /// The JSON document, as `export` printed it.
        file: PathBuf,
    },
}

/// Which persisted data, and the password that opens it.
#[derive(clap::Args, Debug)]
pub struct Target {
    /// The reflector's data directory.
    #[arg(long, default_value = "./synq-data")]
    data_dir: PathBuf,
    /// The app id.
    #[arg(long)]
    app_id: String,
    /// The session name.
    #[arg(long)]
    name: String,
    /// The session password.
    #[arg(long)]
    password: String,
    /// Derive the key with the cheap test parameters (only for data written by tests).
    #[arg(long, hide = true)]
    insecure_fast_kdf: bool,
}

impl Target {
    fn open(&self) -> Result<(DiskStorage, PersistentId, SessionKey), String> {
        let app = AppId::new(&self.app_id).map_err(|e| e.to_string())?;
        let name = SessionName::new(&self.name).map_err(|e| e.to_string())?;
        let persistent = PersistentId::derive(&app, &name, &IdOptions::none());
        let kdf = if self.insecure_fast_kdf { KdfParams::INSECURE_FAST } else { KdfParams::RECOMMENDED };
        let key = SessionKey::derive(&self.password, &persistent, kdf).map_err(|e| e.to_string())?;
        let storage = DiskStorage::open(&self.data_dir).map_err(|e| e.to_string())?;
        Ok((storage, persistent, key))
    }
}

/// Runs the action; the exit code says whether it worked.
pub fn run(action: Action) -> ExitCode {
    let result = match action {
        Action::Export(target) => export(&target),
        Action::Import { target, file } => import(&target, &file),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("synq-reflector persisted: {message}");
            ExitCode::FAILURE
        }
    }
}

fn export(target: &Target) -> Result<(), String> {
    let (mut storage, persistent, key) = target.open()?;
    let record = storage
        .load_persisted(&persistent)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no persisted data for {}/{}", target.app_id, target.name))?;
    let json = key
        .open(SealKind::Persisted, &Binding::Persistent(persistent), &record.data)
        .map_err(|_| "the persisted data does not open with this password (wrong session password)".to_string())?;
    println!("{}", String::from_utf8_lossy(&json));
    Ok(())
}

fn import(target: &Target, file: &PathBuf) -> Result<(), String> {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).map_err(|e| e.to_string())?
    } else {
        std::fs::read_to_string(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?
    };
    let json = synq_protocol::canonical_json::canonicalize(text.trim().as_bytes()).map_err(|e| e.to_string())?;
    let (mut storage, persistent, key) = target.open()?;
    let data = key.seal(SealKind::Persisted, &Binding::Persistent(persistent), &json);
    let pinned = storage.load_member_key(&persistent).map_err(|e| e.to_string())?;
    if pinned.is_some_and(|pinned| pinned != key.member_key().0) {
        return Err("wrong session password: this persistent id is pinned to another password".into());
    }
    let vote = key.vote_digest(&sha256(&json));
    let mut record =
        PersistRecord { time: 0, vote, data, signature: synq_protocol::membership::MemberSignature::EMPTY };
    synq_protocol::membership::sign_persist(&key, &persistent, &mut record);
    storage.store_persisted(&persistent, &record).map_err(|e| e.to_string())?;
    eprintln!("imported {} bytes of persisted data for {}/{}", json.len(), target.app_id, target.name);
    Ok(())
}
