//! SMTP delivery over one connection, kept open and reused between mails.
//!
//! lettre's protocol client does the talking; this module owns the socket so
//! that it can set `TCP_NODELAY` (without it every mail waits ~40 ms for a
//! delayed ACK, because the message and its final `.` go out as two small
//! writes) and so that it knows at which step a server refused a mail:
//! a 5xx for a recipient or the message is permanent for that mail, while
//! trouble connecting, with TLS, logging in or with the sender is not the
//! mail's fault and is retried.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use lettre::Message;
use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{
    AsyncSmtpConnection, AsyncTokioStream, Certificate, TlsParameters,
};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_rustls::client::TlsStream;

use crate::config::{SmtpConfig, SmtpSecurity};
use crate::keycloak::error_chain;
use crate::mail::{MailError, Mailer};
use crate::tls;

/// Each SMTP step (connect, TLS, one command) gives up after this long.
const SMTP_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection idle for longer is closed and a new one opened: servers drop
/// idle clients, often after a minute.
const SMTP_IDLE: Duration = Duration::from_secs(50);

/// The step of an SMTP exchange, to say where something failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Connect,
    Tls,
    Greeting,
    StartTls,
    Auth,
    Sender,
    Recipient,
    Data,
    Message,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Connect => "connecting",
            Step::Tls => "the TLS handshake",
            Step::Greeting => "the greeting (EHLO)",
            Step::StartTls => "STARTTLS",
            Step::Auth => "logging in (AUTH)",
            Step::Sender => "MAIL FROM (the sender)",
            Step::Recipient => "RCPT TO (a recipient)",
            Step::Data => "DATA",
            Step::Message => "the message",
        })
    }
}

/// What to change, in one sentence, for the SMTP failures that are almost
/// always a setting: the operator reads this next to the server's words.
fn hint(step: Step, security: SmtpSecurity, port: u16, error: &str) -> Option<String> {
    let error_lower = error.to_ascii_lowercase();
    let tls_step = step == Step::Tls;
    let early = matches!(
        step,
        Step::Connect | Step::Tls | Step::Greeting | Step::StartTls
    );
    if error.contains("UnknownIssuer") || error_lower.contains("unknown ca") {
        return Some(
            "the server's certificate is not signed by a CA the notifier knows: put your \
             CA's certificate (PEM) in a file and name it in SMTP_CA_FILE"
                .into(),
        );
    }
    if error.contains("NotValidForName") {
        return Some(
            "the server's certificate does not name SMTP_HOST: set SMTP_HOST to the name \
             the certificate was issued for"
                .into(),
        );
    }
    if early && security == SmtpSecurity::Tls && port != 465 {
        return Some(format!(
            "port {port} usually speaks plain SMTP first: with SMTP_SECURITY=tls use port \
             465, or keep port {port} with SMTP_SECURITY=starttls (or none, for a server \
             without TLS)"
        ));
    }
    if early && security == SmtpSecurity::StartTls && port == 465 && !tls_step {
        return Some(
            "port 465 expects TLS from the first byte: set SMTP_SECURITY=tls (or use port \
             587 with starttls)"
                .into(),
        );
    }
    if step == Step::Auth {
        if error_lower.contains("no compatible authentication mechanism") {
            return Some(
                "the server offers no login here: if it needs none, unset SMTP_PASSWORD; \
                 many servers offer it only after STARTTLS (SMTP_SECURITY=starttls)"
                    .into(),
            );
        }
        return Some(
            "the server refused the login: check SMTP_USERNAME (default: the sender's \
             address) and SMTP_PASSWORD"
                .into(),
        );
    }
    if step == Step::Sender && error.contains(" 5") {
        return Some(
            "the server refused the sender: SMTP_SENDER must be an address this account may \
             send as"
                .into(),
        );
    }
    None
}

struct OpenConnection {
    conn: AsyncSmtpConnection,
    last_used: Instant,
}

/// Sends mails through one reused SMTP connection.
pub struct SmtpMailer {
    host: String,
    port: u16,
    security: SmtpSecurity,
    starttls: Option<TlsParameters>,
    implicit_tls: Option<Arc<rustls::ClientConfig>>,
    credentials: Option<Credentials>,
    hello: ClientId,
    open: Mutex<Option<OpenConnection>>,
}

impl SmtpMailer {
    pub fn new(smtp: &SmtpConfig) -> Result<Self, MailError> {
        let setup = |reason: String| MailError::Setup {
            host: smtp.host.clone(),
            port: smtp.port,
            reason,
        };
        let starttls = match smtp.security {
            SmtpSecurity::StartTls => {
                let mut params = TlsParameters::builder(smtp.host.clone());
                for cert in &smtp.extra_roots {
                    let cert = Certificate::from_der(cert.to_vec())
                        .map_err(|err| setup(error_chain(&err)))?;
                    params = params.add_root_certificate(cert);
                }
                Some(
                    params
                        .build_rustls()
                        .map_err(|err| setup(error_chain(&err)))?,
                )
            }
            _ => None,
        };
        let implicit_tls = match smtp.security {
            SmtpSecurity::Tls => Some(Arc::new(
                tls::client_config(&smtp.extra_roots).map_err(|err| setup(error_chain(&err)))?,
            )),
            _ => None,
        };
        Ok(Self {
            host: smtp.host.clone(),
            port: smtp.port,
            security: smtp.security,
            starttls,
            implicit_tls,
            // No password, no AUTH: servers such as Mailpit offer none and
            // refuse the command.
            credentials: smtp
                .credentials
                .as_ref()
                .map(|c| Credentials::new(c.username.clone(), c.password.expose().to_owned())),
            hello: ClientId::default(),
            open: Mutex::new(None),
        })
    }

    /// A refusal of a recipient or the message itself is the mail's fault;
    /// at every other step it is the connection's or the configuration's.
    fn classify(&self, step: Step, err: &lettre::transport::smtp::Error) -> MailError {
        let text = self.describe(step, &error_chain(err));
        match step {
            Step::Recipient | Step::Data | Step::Message if err.is_permanent() => {
                MailError::Permanent(text)
            }
            _ => MailError::Transient(text),
        }
    }

    fn io_failure(&self, step: Step, err: &dyn std::error::Error) -> MailError {
        MailError::Transient(self.describe(step, &error_chain(err)))
    }

    /// "STEP failed: ERROR", and a hint when the cause is likely a setting.
    fn describe(&self, step: Step, error: &str) -> String {
        match hint(step, self.security, self.port, error) {
            Some(hint) => format!("{step} failed: {error}. Hint: {hint}"),
            None => format!("{step} failed: {error}"),
        }
    }

    async fn within<T>(&self, step: Step, future: impl Future<Output = T>) -> Result<T, MailError> {
        tokio::time::timeout(SMTP_TIMEOUT, future)
            .await
            .map_err(|_| {
                MailError::Transient(self.describe(
                    step,
                    &format!(
                        "no answer within {}",
                        humantime::format_duration(SMTP_TIMEOUT)
                    ),
                ))
            })
    }

    async fn connect(&self) -> Result<AsyncSmtpConnection, MailError> {
        let tcp = self
            .within(
                Step::Connect,
                TcpStream::connect((self.host.as_str(), self.port)),
            )
            .await?
            .map_err(|err| self.io_failure(Step::Connect, &err))?;
        tcp.set_nodelay(true)
            .map_err(|err| self.io_failure(Step::Connect, &err))?;
        let stream: Box<dyn AsyncTokioStream> = match &self.implicit_tls {
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                    .map_err(|err| self.io_failure(Step::Tls, &err))?;
                let tls = self
                    .within(
                        Step::Tls,
                        tokio_rustls::TlsConnector::from(Arc::clone(config)).connect(name, tcp),
                    )
                    .await?
                    .map_err(|err| self.io_failure(Step::Tls, &err))?;
                Box::new(ImplicitTls(tls))
            }
            None => Box::new(tcp),
        };
        let mut conn = self
            .within(
                Step::Greeting,
                AsyncSmtpConnection::connect_with_transport(stream, &self.hello),
            )
            .await?
            .map_err(|err| self.classify(Step::Greeting, &err))?;
        if let Some(params) = &self.starttls {
            if !conn.can_starttls() {
                return Err(MailError::Transient(format!(
                    "{} failed: {}:{} does not offer STARTTLS (SMTP_SECURITY=starttls); \
                     use SMTP_SECURITY=tls for a port that speaks TLS from the start \
                     (usually 465), or none for a local relay",
                    Step::StartTls,
                    self.host,
                    self.port
                )));
            }
            self.within(Step::StartTls, conn.starttls(params.clone(), &self.hello))
                .await?
                .map_err(|err| self.classify(Step::StartTls, &err))?;
        }
        if let Some(credentials) = &self.credentials {
            self.within(
                Step::Auth,
                conn.auth(&[Mechanism::Plain, Mechanism::Login], credentials),
            )
            .await?
            .map_err(|err| self.classify(Step::Auth, &err))?;
        }
        Ok(conn)
    }

    /// One mail transaction on `conn`, step by step; the server's last reply.
    async fn transaction(
        &self,
        conn: &mut AsyncSmtpConnection,
        envelope: &Envelope,
        body: &[u8],
    ) -> Result<Response, MailError> {
        let mut options = Vec::new();
        if !body.is_ascii() && conn.server_info().supports_feature(Extension::EightBitMime) {
            options.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }
        let non_ascii_address = envelope
            .from()
            .into_iter()
            .chain(envelope.to())
            .any(|a| !AsRef::<str>::as_ref(a).is_ascii());
        if non_ascii_address && conn.server_info().supports_feature(Extension::SmtpUtfEight) {
            options.push(MailParameter::SmtpUtfEight);
        }
        self.within(
            Step::Sender,
            conn.command(Mail::new(envelope.from().cloned(), options)),
        )
        .await?
        .map_err(|err| self.classify(Step::Sender, &err))?;
        for recipient in envelope.to() {
            self.within(
                Step::Recipient,
                conn.command(Rcpt::new(recipient.clone(), vec![])),
            )
            .await?
            .map_err(|err| self.classify(Step::Recipient, &err))?;
        }
        self.within(Step::Data, conn.command(Data))
            .await?
            .map_err(|err| self.classify(Step::Data, &err))?;
        self.within(Step::Message, conn.message(body))
            .await?
            .map_err(|err| self.classify(Step::Message, &err))
    }

    /// Connects, negotiates TLS and logs in as a mail would, then says
    /// goodbye without sending anything (for `check`).
    pub async fn probe(&self) -> Result<String, MailError> {
        let mut conn = self.connect().await?;
        let _ = self.within(Step::Message, conn.quit()).await;
        let tls = match self.security {
            SmtpSecurity::StartTls => "STARTTLS",
            SmtpSecurity::Tls => "TLS",
            SmtpSecurity::None => "no encryption",
        };
        let login = match &self.credentials {
            Some(_) => "logged in",
            None => "no login",
        };
        Ok(format!(
            "{}:{} answered ({tls}, {login})",
            self.host, self.port
        ))
    }

    /// Sends `message` and returns the server's reply to it.
    pub async fn send_with_reply(&self, message: Message) -> Result<String, MailError> {
        let envelope = message.envelope().clone();
        let body = message.formatted();
        let mut open = self.open.lock().await;
        let reusable = open
            .take()
            .filter(|o| o.last_used.elapsed() < SMTP_IDLE && !o.conn.has_broken());
        // A reused connection may have been closed by the server since; then
        // the mail is tried once more on a new one before giving up.
        let mut attempts = match reusable {
            Some(o) => vec![Some(o.conn), None],
            None => vec![None],
        }
        .into_iter()
        .peekable();
        while let Some(conn) = attempts.next() {
            let mut conn = match conn {
                Some(conn) => conn,
                None => self.connect().await?,
            };
            match self.transaction(&mut conn, &envelope, &body).await {
                Ok(reply) => {
                    *open = Some(OpenConnection {
                        conn,
                        last_used: Instant::now(),
                    });
                    return Ok(format!(
                        "{} {}",
                        reply.code(),
                        reply.message().collect::<Vec<_>>().join(" ")
                    ));
                }
                Err(err) => {
                    conn.abort().await;
                    let retry_fresh =
                        matches!(err, MailError::Transient(_)) && attempts.peek().is_some();
                    if !retry_fresh {
                        return Err(err);
                    }
                }
            }
        }
        Err(MailError::Transient("no SMTP connection".into()))
    }
}

impl Mailer for SmtpMailer {
    async fn send(&self, message: Message) -> Result<(), MailError> {
        self.send_with_reply(message).await.map(|_| ())
    }
}

/// A TLS-from-the-start stream, in the shape lettre's client accepts.
struct ImplicitTls(TlsStream<TcpStream>);

impl fmt::Debug for ImplicitTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ImplicitTls")
    }
}

impl AsyncTokioStream for ImplicitTls {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.0.get_ref().0.peer_addr()
    }
}

impl AsyncRead for ImplicitTls {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for ImplicitTls {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hint_for(step: Step, security: SmtpSecurity, port: u16, error: &str) -> String {
        hint(step, security, port, error).unwrap_or_default()
    }

    #[test]
    fn common_mistakes_get_a_sentence_saying_what_to_change() {
        let tls_on_587 = hint_for(
            Step::Tls,
            SmtpSecurity::Tls,
            587,
            "received corrupt message",
        );
        assert!(
            tls_on_587.contains("SMTP_SECURITY=starttls"),
            "{tls_on_587}"
        );
        let starttls_on_465 = hint_for(
            Step::Greeting,
            SmtpSecurity::StartTls,
            465,
            "no answer within 30s",
        );
        assert!(
            starttls_on_465.contains("SMTP_SECURITY=tls"),
            "{starttls_on_465}"
        );
        let unknown_ca = hint_for(
            Step::StartTls,
            SmtpSecurity::StartTls,
            587,
            "invalid peer certificate: UnknownIssuer",
        );
        assert!(unknown_ca.contains("SMTP_CA_FILE"), "{unknown_ca}");
        let login = hint_for(
            Step::Auth,
            SmtpSecurity::StartTls,
            587,
            "535 5.7.8 bad credentials",
        );
        assert!(
            login.contains("SMTP_USERNAME") && login.contains("SMTP_PASSWORD"),
            "{login}"
        );
        let no_auth = hint_for(
            Step::Auth,
            SmtpSecurity::None,
            25,
            "No compatible authentication mechanism was found",
        );
        assert!(no_auth.contains("unset SMTP_PASSWORD"), "{no_auth}");
    }

    #[test]
    fn a_refused_recipient_or_a_busy_server_gets_no_hint() {
        assert_eq!(
            hint(
                Step::Recipient,
                SmtpSecurity::StartTls,
                587,
                "550 no such user"
            ),
            None
        );
        assert_eq!(
            hint(
                Step::Connect,
                SmtpSecurity::StartTls,
                587,
                "Connection refused"
            ),
            None
        );
    }
}
