//! Bearer-token authentication of every dmqsm RPC: who is calling ([`Principal`]), what
//! they may do ([`Role`]), the coordinator's table of accepted tokens ([`TokenTable`]),
//! and the two tonic interceptors that carry a token ([`Bearer`], client side) and check
//! it ([`Authenticator`], server side).
//!
//! Conventions (RFC 6750): a token travels as the `authorization: Bearer <token>`
//! metadata of each request. Tokens are read from a file or an environment variable,
//! never from a command-line flag, where `ps` would show them ([`read_token`]).
//!
//! The table file has one token per line, `ROLE NAME TOKEN`, `#` starting a comment:
//!
//! ```text
//! # role   name      token (≥ 16 characters)
//! admin    ops       3f9c0d…
//! user     alice     a81e77…
//! worker   gpu-pool  5b20c4…
//! ```
//!
//! Tokens are kept only as SHA-256 digests and looked up by digest, so the comparison
//! does not leak a token's bytes through timing.
//!
//! With no table configured, authentication is off: every caller is [`Principal::local`],
//! which may do everything. Servers then bind loopback only (see
//! [`require_loopback_without_auth`]).

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Shortest token accepted, in characters: 16 random characters of a base-64 or hex
/// alphabet are 64–96 bits, out of reach of guessing over a network.
pub const MIN_TOKEN_CHARS: usize = 16;

/// Environment variable holding a client's or worker's bearer token.
pub const TOKEN_ENV: &str = "DMQSM_TOKEN";

/// Environment variable naming a file that holds the bearer token (first line).
pub const TOKEN_FILE_ENV: &str = "DMQSM_TOKEN_FILE";

/// Errors of reading tokens and token tables.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A token or table file could not be read.
    #[error("cannot read {what} {path}: {cause}")]
    Read {
        /// What the file is ("token file", "token table").
        what: &'static str,
        /// Its path.
        path: String,
        /// The I/O error.
        cause: String,
    },
    /// A line of the token table is malformed.
    #[error("token table {path}, line {line}: {problem}")]
    Table {
        /// Path of the table.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        problem: String,
    },
    /// A token is unusable (too short, empty, has whitespace).
    #[error("{what}: {problem}")]
    Token {
        /// Where the token came from.
        what: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A server without authentication was asked to listen beyond loopback.
    #[error(
        "refusing to listen on {addr} without authentication: give a token table ({hint}) \
         or listen on 127.0.0.1"
    )]
    ExposedWithoutAuth {
        /// The requested listen address.
        addr: SocketAddr,
        /// How to configure tokens for this server.
        hint: &'static str,
    },
}

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A score-model worker: may register itself and send heartbeats, nothing else.
    Worker,
    /// A user: submits jobs and sees, watches, fetches and cancels only their own.
    User,
    /// An operator: sees and cancels every job and lists workers.
    Admin,
}

impl Role {
    /// The role's name in token tables ("worker", "user", "admin").
    pub fn name(self) -> &'static str {
        match self {
            Role::Worker => "worker",
            Role::User => "user",
            Role::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "worker" => Some(Role::Worker),
            "user" => Some(Role::User),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// An authenticated caller, attached to each request's extensions by [`Authenticator`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal {
    /// The name given to the token in the table (a user, a worker pool, an operator).
    pub name: String,
    /// What the token allows; `None` for [`Principal::local`] (authentication off).
    pub role: Option<Role>,
}

impl Principal {
    /// The caller when authentication is off (a single-user, loopback-only server): may
    /// do everything, named "local".
    pub fn local() -> Self {
        Self {
            name: "local".to_string(),
            role: None,
        }
    }

    /// True if this caller holds `role`, or authentication is off. An admin also holds
    /// the user role; nobody but a worker (or the local caller) holds the worker role.
    pub fn has(&self, role: Role) -> bool {
        match (self.role, role) {
            (None, _) => true,
            (Some(Role::Admin), Role::User | Role::Admin) => true,
            (Some(have), want) => have == want,
        }
    }

    /// True if this caller sees every job (an admin, or authentication off).
    pub fn sees_all_jobs(&self) -> bool {
        matches!(self.role, None | Some(Role::Admin))
    }

    /// `PERMISSION_DENIED` unless the caller holds `role`; `action` names the RPC.
    pub fn require(&self, role: Role, action: &str) -> Result<(), Status> {
        if self.has(role) {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "{action} needs a {} token; {:?} holds a {} token",
                role.name(),
                self.name,
                self.role.map(Role::name).unwrap_or("local"),
            )))
        }
    }

    /// The principal an [`Authenticator`] attached to `request` (the local one if none
    /// was attached, which only happens for services mounted without an authenticator).
    pub fn of<T>(request: &Request<T>) -> Principal {
        request
            .extensions()
            .get::<Principal>()
            .cloned()
            .unwrap_or_else(Principal::local)
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn check_token(token: &str, what: &str) -> Result<(), AuthError> {
    let bad = |problem: String| AuthError::Token {
        what: what.to_string(),
        problem,
    };
    if token.chars().any(char::is_whitespace) {
        return Err(bad("the token contains whitespace".into()));
    }
    if token.chars().count() < MIN_TOKEN_CHARS {
        return Err(bad(format!(
            "the token has {} characters; at least {MIN_TOKEN_CHARS} are required",
            token.chars().count()
        )));
    }
    if !token.chars().all(|c| c.is_ascii_graphic()) {
        return Err(bad(
            "the token must be printable ASCII (it travels in an HTTP header)".into(),
        ));
    }
    Ok(())
}

/// The tokens a server accepts, each with its [`Principal`] (see the module docs for the
/// file format).
#[derive(Clone, Default)]
pub struct TokenTable {
    by_digest: HashMap<[u8; 32], Principal>,
}

impl std::fmt::Debug for TokenTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenTable")
            .field("tokens", &self.by_digest.len())
            .finish()
    }
}

impl TokenTable {
    /// An empty table (accepts nobody).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token for `name` with `role`. Refuses short tokens and a token given twice.
    pub fn insert(&mut self, role: Role, name: &str, token: &str) -> Result<(), AuthError> {
        check_token(token, &format!("token of {name:?}"))?;
        let d = digest(token);
        if self.by_digest.contains_key(&d) {
            return Err(AuthError::Token {
                what: format!("token of {name:?}"),
                problem: "the same token is listed twice".into(),
            });
        }
        self.by_digest.insert(
            d,
            Principal {
                name: name.to_string(),
                role: Some(role),
            },
        );
        Ok(())
    }

    /// Parses a table from text; `path` names it in errors.
    pub fn parse(text: &str, path: &str) -> Result<Self, AuthError> {
        let mut t = Self::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |problem: String| AuthError::Table {
                path: path.to_string(),
                line: i + 1,
                problem,
            };
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [role, name, token] = fields[..] else {
                return Err(bad(format!(
                    "expected `ROLE NAME TOKEN`, found {} fields",
                    fields.len()
                )));
            };
            let role = Role::parse(role)
                .ok_or_else(|| bad(format!("unknown role {role:?} (use worker, user or admin)")))?;
            t.insert(role, name, token)
                .map_err(|e| bad(e.to_string()))?;
        }
        if t.is_empty() {
            return Err(AuthError::Table {
                path: path.to_string(),
                line: 0,
                problem: "the table lists no tokens".into(),
            });
        }
        Ok(t)
    }

    /// Reads a table file.
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|e| AuthError::Read {
            what: "token table",
            path: path.display().to_string(),
            cause: e.to_string(),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    /// True if the table lists no token.
    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// The principal holding `token`, if any.
    pub fn lookup(&self, token: &str) -> Option<&Principal> {
        self.by_digest.get(&digest(token))
    }
}

/// Reads a bearer token: from the file `file` if given, else from the file named by
/// `$DMQSM_TOKEN_FILE`, else from `$DMQSM_TOKEN`. `Ok(None)` when none is configured.
/// Only the first line of a file counts; surrounding whitespace is dropped.
pub fn read_token(file: Option<&Path>) -> Result<Option<String>, AuthError> {
    let env_file = std::env::var_os(TOKEN_FILE_ENV).map(std::path::PathBuf::from);
    if let Some(path) = file.map(Path::to_path_buf).or(env_file) {
        let text = std::fs::read_to_string(&path).map_err(|e| AuthError::Read {
            what: "token file",
            path: path.display().to_string(),
            cause: e.to_string(),
        })?;
        let token = text.lines().next().unwrap_or("").trim().to_string();
        check_token(&token, &format!("token file {}", path.display()))?;
        return Ok(Some(token));
    }
    match std::env::var(TOKEN_ENV) {
        Ok(t) if !t.trim().is_empty() => {
            let token = t.trim().to_string();
            check_token(&token, &format!("${TOKEN_ENV}"))?;
            Ok(Some(token))
        }
        _ => Ok(None),
    }
}

/// Refuses to serve beyond loopback without authentication. `hint` names the flag or
/// variable that configures tokens for this server.
pub fn require_loopback_without_auth(
    addr: SocketAddr,
    authenticated: bool,
    hint: &'static str,
) -> Result<(), AuthError> {
    if authenticated || addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(AuthError::ExposedWithoutAuth { addr, hint })
    }
}

/// Client-side interceptor: adds `authorization: Bearer <token>` to every request (does
/// nothing without a token).
#[derive(Clone, Default)]
pub struct Bearer {
    header: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bearer")
            .field("token", &self.header.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Bearer {
    /// An interceptor presenting `token`, or none.
    pub fn new(token: Option<&str>) -> Result<Self, AuthError> {
        let header = match token {
            None => None,
            Some(t) => {
                check_token(t, "bearer token")?;
                let mut v: MetadataValue<tonic::metadata::Ascii> = format!("Bearer {t}")
                    .parse()
                    .map_err(|_| AuthError::Token {
                        what: "bearer token".into(),
                        problem: "not a valid header value".into(),
                    })?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        Ok(Self { header })
    }

    /// True if a token is presented.
    pub fn is_set(&self) -> bool {
        self.header.is_some()
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            request.metadata_mut().insert("authorization", h.clone());
        }
        Ok(request)
    }
}

/// The bearer token of a request, if it carries a well-formed one.
pub fn bearer_of<T>(request: &Request<T>) -> Option<&str> {
    let v = request.metadata().get("authorization")?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Server-side interceptor: resolves the request's bearer token to a [`Principal`] and
/// attaches it to the request's extensions; `UNAUTHENTICATED` for a missing or unknown
/// token. Without a table every request gets [`Principal::local`].
#[derive(Clone, Debug, Default)]
pub struct Authenticator {
    table: Option<std::sync::Arc<TokenTable>>,
}

impl Authenticator {
    /// Checks tokens against `table`; `None` turns authentication off.
    pub fn new(table: Option<TokenTable>) -> Self {
        Self {
            table: table.map(std::sync::Arc::new),
        }
    }

    /// Accepts exactly one token, held by `name` with `role` (a worker checks that its
    /// caller knows the worker's own token).
    pub fn single(role: Role, name: &str, token: &str) -> Result<Self, AuthError> {
        let mut t = TokenTable::new();
        t.insert(role, name, token)?;
        Ok(Self::new(Some(t)))
    }

    /// True if tokens are checked.
    pub fn enabled(&self) -> bool {
        self.table.is_some()
    }

    /// The principal of a request, or why it is refused.
    pub fn authenticate<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        let Some(table) = &self.table else {
            return Ok(Principal::local());
        };
        let token = bearer_of(request).ok_or_else(|| {
            Status::unauthenticated(
                "this server requires a bearer token: set $DMQSM_TOKEN or $DMQSM_TOKEN_FILE",
            )
        })?;
        table
            .lookup(token)
            .cloned()
            .ok_or_else(|| Status::unauthenticated("the bearer token is not accepted here"))
    }
}

impl Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let p = self.authenticate(&request)?;
        request.extensions_mut().insert(p);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T1: &str = "0123456789abcdef-user";
    const T2: &str = "fedcba9876543210-work";

    #[test]
    fn table_parses_roles_and_refuses_bad_lines() {
        let t = TokenTable::parse(
            &format!("# comment\nuser alice {T1}\n\nworker pool {T2}  # trailing\n"),
            "t",
        )
        .unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.lookup(T1).unwrap().name, "alice");
        assert_eq!(t.lookup(T2).unwrap().role, Some(Role::Worker));
        assert!(t.lookup("0123456789abcdef-nope").is_none());
        let e = TokenTable::parse("user alice short", "t").unwrap_err();
        assert!(e.to_string().contains("at least 16"), "{e}");
        let e = TokenTable::parse(&format!("root bob {T1}"), "t").unwrap_err();
        assert!(e.to_string().contains("unknown role"), "{e}");
        let e = TokenTable::parse(&format!("user a {T1}\nadmin b {T1}"), "t").unwrap_err();
        assert!(e.to_string().contains("line 2") && e.to_string().contains("twice"));
        assert!(TokenTable::parse("# nothing\n", "t").is_err());
    }

    #[test]
    fn roles_allow_what_the_docs_say() {
        let p = |r| Principal {
            name: "x".into(),
            role: Some(r),
        };
        assert!(p(Role::Admin).has(Role::User));
        assert!(!p(Role::Admin).has(Role::Worker));
        assert!(!p(Role::User).has(Role::Admin));
        assert!(!p(Role::User).has(Role::Worker));
        assert!(!p(Role::Worker).has(Role::User));
        assert!(p(Role::Worker).has(Role::Worker));
        assert!(Principal::local().has(Role::Worker) && Principal::local().sees_all_jobs());
        assert!(!p(Role::User).sees_all_jobs());
        let e = p(Role::Worker)
            .require(Role::User, "SubmitJob")
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn interceptors_carry_and_check_the_token() {
        let mut table = TokenTable::new();
        table.insert(Role::User, "alice", T1).unwrap();
        let mut auth = Authenticator::new(Some(table));
        let mut bearer = Bearer::new(Some(T1)).unwrap();
        let req = bearer.call(Request::new(())).unwrap();
        let req = auth.call(req).unwrap();
        assert_eq!(Principal::of(&req).name, "alice");
        // No token, wrong token, wrong scheme.
        let e = auth.call(Request::new(())).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let mut other = Bearer::new(Some(T2)).unwrap();
        let e = auth
            .call(other.call(Request::new(())).unwrap())
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let mut r = Request::new(());
        r.metadata_mut()
            .insert("authorization", format!("Basic {T1}").parse().unwrap());
        assert!(auth.call(r).is_err());
        // Off: everyone is local.
        let mut off = Authenticator::new(None);
        assert_eq!(
            Principal::of(&off.call(Request::new(())).unwrap()),
            Principal::local()
        );
        assert!(Bearer::new(Some("short")).is_err());
    }

    #[test]
    fn loopback_rule() {
        let lo: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:1".parse().unwrap();
        assert!(require_loopback_without_auth(lo, false, "--tokens").is_ok());
        assert!(require_loopback_without_auth(any, true, "--tokens").is_ok());
        let e = require_loopback_without_auth(any, false, "--tokens").unwrap_err();
        assert!(e.to_string().contains("0.0.0.0:1") && e.to_string().contains("--tokens"));
    }
}
