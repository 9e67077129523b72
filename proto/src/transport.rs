//! TLS for dmqsm's gRPC links (tonic over rustls with ring), shared by both ends: the
//! certificate files a server presents ([`ServerTls`]), the trust and optional client
//! certificate a client dials with ([`ClientTls`]), and [`endpoint`], the one place a
//! URL becomes a tonic [`Endpoint`].
//!
//! - `http://` URLs are plain TCP; `https://` URLs need a [`ClientTls`] with a CA (the
//!   private CA of the cluster; public roots are not bundled).
//! - mTLS: a server given a client CA ([`ServerTls::client_ca`]) accepts only clients
//!   whose certificate that CA signed; the client then presents its own certificate and
//!   key ([`ClientTls::cert`], [`ClientTls::key`]).
//! - All files are PEM.

use crate::auth::Bearer;
use std::path::{Path, PathBuf};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig,
};

/// A channel whose every request carries a bearer token (or none): what every dmqsm
/// client speaks through.
pub type AuthChannel = InterceptedService<Channel, Bearer>;

/// Errors of loading certificates or building an endpoint.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A PEM file could not be read.
    #[error("cannot read {what} {path}: {cause}")]
    Read {
        /// What the file is ("TLS certificate", "TLS key", "CA certificate").
        what: &'static str,
        /// Its path.
        path: String,
        /// The I/O error.
        cause: String,
    },
    /// A setting is inconsistent (a key without a certificate, https without a CA).
    #[error("{0}")]
    Config(String),
    /// The URL is not one tonic can dial.
    #[error("bad address {url:?}: {cause}")]
    Address {
        /// The URL.
        url: String,
        /// Why.
        cause: String,
    },
}

fn read_pem(path: &Path, what: &'static str) -> Result<Vec<u8>, TransportError> {
    std::fs::read(path).map_err(|e| TransportError::Read {
        what,
        path: path.display().to_string(),
        cause: e.to_string(),
    })
}

/// What a TLS server presents: its certificate chain and key, and optionally the CA its
/// clients' certificates must chain to (mTLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    /// PEM certificate chain of the server.
    pub cert: PathBuf,
    /// PEM private key of the server.
    pub key: PathBuf,
    /// PEM CA certificate; when set, clients must present a certificate it signed.
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    /// From optional flags: `None` when neither certificate nor key is given, an error
    /// when only one of them is, or a client CA comes without them.
    pub fn from_parts(
        cert: Option<&Path>,
        key: Option<&Path>,
        client_ca: Option<&Path>,
    ) -> Result<Option<Self>, TransportError> {
        match (cert, key) {
            (None, None) if client_ca.is_none() => Ok(None),
            (Some(c), Some(k)) => Ok(Some(Self {
                cert: c.to_path_buf(),
                key: k.to_path_buf(),
                client_ca: client_ca.map(Path::to_path_buf),
            })),
            _ => Err(TransportError::Config(
                "TLS needs both --tls-cert and --tls-key (and --tls-client-ca only with them)"
                    .into(),
            )),
        }
    }

    /// The tonic server configuration (reads the files).
    pub fn load(&self) -> Result<ServerTlsConfig, TransportError> {
        let identity = Identity::from_pem(
            read_pem(&self.cert, "TLS certificate")?,
            read_pem(&self.key, "TLS key")?,
        );
        let mut c = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            c = c.client_ca_root(Certificate::from_pem(read_pem(ca, "CA certificate")?));
        }
        Ok(c)
    }
}

/// How a client dials `https://` servers: the CA it trusts, optionally its own
/// certificate for mTLS, and the name to verify when it differs from the URL's host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// PEM CA certificate the server's certificate must chain to.
    pub ca: Option<PathBuf>,
    /// PEM client certificate (mTLS).
    pub cert: Option<PathBuf>,
    /// PEM client key (mTLS).
    pub key: Option<PathBuf>,
    /// Server name to verify (default: the URL's host).
    pub domain: Option<String>,
}

impl ClientTls {
    /// True if nothing is configured (plain `http://` only).
    pub fn is_empty(&self) -> bool {
        self.ca.is_none() && self.cert.is_none() && self.key.is_none()
    }

    /// The tonic client configuration (reads the files).
    pub fn load(&self) -> Result<ClientTlsConfig, TransportError> {
        let mut c = ClientTlsConfig::new();
        let ca = self.ca.as_ref().ok_or_else(|| {
            TransportError::Config(
                "an https:// address needs the CA certificate that signed the server's \
                 (--tls-ca)"
                    .into(),
            )
        })?;
        c = c.ca_certificate(Certificate::from_pem(read_pem(ca, "CA certificate")?));
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                c = c.identity(Identity::from_pem(
                    read_pem(cert, "TLS certificate")?,
                    read_pem(key, "TLS key")?,
                ));
            }
            (None, None) => {}
            _ => {
                return Err(TransportError::Config(
                    "a client certificate needs both its certificate and its key".into(),
                ));
            }
        }
        if let Some(d) = &self.domain {
            c = c.domain_name(d.clone());
        }
        Ok(c)
    }
}

/// HTTP/2 flow control and TCP_NODELAY for every dmqsm link, both ends (the coordinator, its
/// CLI clients and the workers). Patch batches are MiB-sized (a 16-patch batch of 48³ is
/// 7 MiB in f32) and result files tens of MiB: on HTTP/2's 64 KiB default windows, or
/// hyper's adaptive windows, which start there and grow by ping round trips on each new
/// connection, they stall on window updates whenever the machine is busy: fetching a
/// 160×192×160 job's files took up to 1.7 s with 4 jobs running on 2 cores, and at most
/// 0.26 s with these fixed windows (the coordinator's scaling bench).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http2Config {
    /// Per-stream initial window (bytes).
    pub initial_stream_window: u32,
    /// Per-connection initial window (bytes).
    pub initial_connection_window: u32,
    /// Let hyper grow windows by BDP estimation instead (they then start at 64 KiB).
    pub adaptive_window: bool,
}

impl Default for Http2Config {
    /// 16 MiB per stream, 64 MiB per connection, fixed.
    fn default() -> Self {
        Self {
            initial_stream_window: 16 << 20,
            initial_connection_window: 64 << 20,
            adaptive_window: false,
        }
    }
}

impl Http2Config {
    /// These settings on a client endpoint, with TCP_NODELAY (small answers must not wait
    /// ~40 ms for delayed ACKs).
    pub fn apply_to_endpoint(&self, e: Endpoint) -> Endpoint {
        let e = e.tcp_nodelay(true);
        if self.adaptive_window {
            e.http2_adaptive_window(true)
        } else {
            e.initial_stream_window_size(Some(self.initial_stream_window))
                .initial_connection_window_size(Some(self.initial_connection_window))
        }
    }

    /// These settings on a server (TCP_NODELAY on listeners it binds itself; servers that
    /// take an incoming stream set it on their sockets).
    pub fn apply_to_server<L>(&self, s: Server<L>) -> Server<L> {
        let s = s.tcp_nodelay(true);
        if self.adaptive_window {
            s.http2_adaptive_window(Some(true))
        } else {
            s.initial_stream_window_size(Some(self.initial_stream_window))
                .initial_connection_window_size(Some(self.initial_connection_window))
        }
    }
}

/// A tonic endpoint for `url` (`http://host:port` or `https://host:port`), with TLS from
/// `tls` for `https://` and the default [`Http2Config`]. Any other scheme (`unix:`, …) is
/// refused before anything is dialled.
pub fn endpoint(url: &str, tls: &ClientTls) -> Result<Endpoint, TransportError> {
    let https = url.starts_with("https://");
    if !https && !url.starts_with("http://") {
        return Err(TransportError::Address {
            url: url.to_string(),
            cause: "only http://host:port and https://host:port addresses are dialled".into(),
        });
    }
    let mut e = Endpoint::from_shared(url.to_string()).map_err(|e| TransportError::Address {
        url: url.to_string(),
        cause: e.to_string(),
    })?;
    if https {
        e = e
            .tls_config(tls.load()?)
            .map_err(|e| TransportError::Address {
                url: url.to_string(),
                cause: format!("TLS: {e}"),
            })?;
    }
    Ok(Http2Config::default().apply_to_endpoint(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_and_half_configs_are_refused() {
        let none = ClientTls::default();
        assert!(endpoint("http://127.0.0.1:1", &none).is_ok());
        for bad in [
            "unix:/tmp/x.sock",
            "unix:///etc/passwd",
            "ftp://h:1",
            "127.0.0.1:1",
        ] {
            let e = endpoint(bad, &none).unwrap_err();
            assert!(e.to_string().contains("only http://"), "{bad}: {e}");
        }
        let e = endpoint("https://127.0.0.1:1", &none).unwrap_err();
        assert!(e.to_string().contains("--tls-ca"), "{e}");
        assert!(ServerTls::from_parts(Some(Path::new("c")), None, None).is_err());
        assert!(ServerTls::from_parts(None, None, Some(Path::new("ca"))).is_err());
        assert_eq!(ServerTls::from_parts(None, None, None).unwrap(), None);
        let missing = ServerTls {
            cert: "/nonexistent/c.pem".into(),
            key: "/nonexistent/k.pem".into(),
            client_ca: None,
        };
        assert!(missing.load().unwrap_err().to_string().contains("c.pem"));
    }
}
