//! Where Parquet files go: a local directory (written to a temporary name, synced, renamed) or
//! an S3-compatible bucket through the `object_store` crate (credentials and endpoint from the
//! usual `AWS_*` variables: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
//! `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use object_store::{ObjectStore, PutPayload};

#[derive(Clone)]
pub enum Output {
    Local(PathBuf),
    S3 { store: Arc<dyn ObjectStore>, prefix: String, url: String },
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Output {
    pub fn open(spec: &str) -> Result<Output, String> {
        if let Some(rest) = spec.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!("{spec}: no bucket (s3://bucket/prefix)"));
            }
            let store = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .map_err(|e| format!("{spec}: {e}"))?;
            return Ok(Output::S3 {
                store: Arc::new(store),
                prefix: prefix.trim_end_matches('/').to_string(),
                url: spec.to_string(),
            });
        }
        if spec.contains("://") {
            return Err(format!("{spec}: Parquet goes to a directory or an s3:// URL"));
        }
        let dir = PathBuf::from(spec);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(Output::Local(dir))
    }

    pub fn describe(&self) -> String {
        match self {
            Output::Local(d) => d.display().to_string(),
            Output::S3 { url, .. } => url.clone(),
        }
    }

    /// Stores a whole file under `name`, replacing one of the same name (a chunk written again
    /// after a restart has the same rows, so the same bytes).
    pub fn put(&self, name: &str, bytes: Vec<u8>) -> Result<(), String> {
        match self {
            Output::Local(dir) => {
                let tmp = dir.join(format!(".{name}.tmp"));
                let path = dir.join(name);
                let write = || -> std::io::Result<()> {
                    let mut f = std::fs::File::create(&tmp)?;
                    f.write_all(&bytes)?;
                    f.sync_all()?;
                    std::fs::rename(&tmp, &path)?;
                    std::fs::File::open(dir)?.sync_all()
                };
                write().map_err(|e| format!("writing {}: {e}", path.display()))
            }
            Output::S3 { store, prefix, url } => {
                let key =
                    if prefix.is_empty() { name.to_string() } else { format!("{prefix}/{name}") };
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("starting the S3 client: {e}"))?;
                let path = object_store::path::Path::from(key.as_str());
                rt.block_on(store.put(&path, PutPayload::from(bytes)))
                    .map(|_| ())
                    .map_err(|e| format!("uploading {name} to {url}: {e}"))
            }
        }
    }
}
