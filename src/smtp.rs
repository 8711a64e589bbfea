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

/// A refusal of a recipient or the message itself is the mail's fault; at
/// every other step it is the connection's or the configuration's.
fn classify(step: Step, err: &lettre::transport::smtp::Error) -> MailError {
    let text = format!("{step} failed: {}", error_chain(err));
    match step {
        Step::Recipient | Step::Data | Step::Message if err.is_permanent() => {
            MailError::Permanent(text)
        }
        _ => MailError::Transient(text),
    }
}

fn io_failure(step: Step, err: &dyn std::error::Error) -> MailError {
    MailError::Transient(format!("{step} failed: {}", error_chain(err)))
}

fn timed_out(step: Step) -> MailError {
    MailError::Transient(format!(
        "{step} failed: no answer within {}",
        humantime::format_duration(SMTP_TIMEOUT)
    ))
}

async fn within<T>(step: Step, future: impl Future<Output = T>) -> Result<T, MailError> {
    tokio::time::timeout(SMTP_TIMEOUT, future)
        .await
        .map_err(|_| timed_out(step))
}

struct OpenConnection {
    conn: AsyncSmtpConnection,
    last_used: Instant,
}

/// Sends mails through one reused SMTP connection.
pub struct SmtpMailer {
    host: String,
    port: u16,
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

    async fn connect(&self) -> Result<AsyncSmtpConnection, MailError> {
        let tcp = within(
            Step::Connect,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await?
        .map_err(|err| io_failure(Step::Connect, &err))?;
        tcp.set_nodelay(true)
            .map_err(|err| io_failure(Step::Connect, &err))?;
        let stream: Box<dyn AsyncTokioStream> = match &self.implicit_tls {
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                    .map_err(|err| io_failure(Step::Tls, &err))?;
                let tls = within(
                    Step::Tls,
                    tokio_rustls::TlsConnector::from(Arc::clone(config)).connect(name, tcp),
                )
                .await?
                .map_err(|err| io_failure(Step::Tls, &err))?;
                Box::new(ImplicitTls(tls))
            }
            None => Box::new(tcp),
        };
        let mut conn = within(
            Step::Greeting,
            AsyncSmtpConnection::connect_with_transport(stream, &self.hello),
        )
        .await?
        .map_err(|err| classify(Step::Greeting, &err))?;
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
            within(Step::StartTls, conn.starttls(params.clone(), &self.hello))
                .await?
                .map_err(|err| classify(Step::StartTls, &err))?;
        }
        if let Some(credentials) = &self.credentials {
            within(
                Step::Auth,
                conn.auth(&[Mechanism::Plain, Mechanism::Login], credentials),
            )
            .await?
            .map_err(|err| classify(Step::Auth, &err))?;
        }
        Ok(conn)
    }

    /// One mail transaction on `conn`, step by step.
    async fn transaction(
        conn: &mut AsyncSmtpConnection,
        envelope: &Envelope,
        body: &[u8],
    ) -> Result<(), MailError> {
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
        within(
            Step::Sender,
            conn.command(Mail::new(envelope.from().cloned(), options)),
        )
        .await?
        .map_err(|err| classify(Step::Sender, &err))?;
        for recipient in envelope.to() {
            within(
                Step::Recipient,
                conn.command(Rcpt::new(recipient.clone(), vec![])),
            )
            .await?
            .map_err(|err| classify(Step::Recipient, &err))?;
        }
        within(Step::Data, conn.command(Data))
            .await?
            .map_err(|err| classify(Step::Data, &err))?;
        within(Step::Message, conn.message(body))
            .await?
            .map_err(|err| classify(Step::Message, &err))?;
        Ok(())
    }
}

impl Mailer for SmtpMailer {
    async fn send(&self, message: Message) -> Result<(), MailError> {
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
            match Self::transaction(&mut conn, &envelope, &body).await {
                Ok(()) => {
                    *open = Some(OpenConnection {
                        conn,
                        last_used: Instant::now(),
                    });
                    return Ok(());
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
