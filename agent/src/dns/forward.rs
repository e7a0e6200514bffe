//! Forwarding names outside the cluster domain to the host's nameservers: the question goes
//! to each upstream in turn over UDP (over TCP when the answer comes back truncated), each
//! given a timeout; the first answer wins. No cache: the stub resolvers in pods cache nothing
//! either, and the upstream answers quickly for names it has cached.

use std::hash::{BuildHasher as _, Hasher as _};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::Instant;

/// Why no upstream answered.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream nameserver is configured")]
    NoUpstream,
    #[error("no upstream nameserver answered ({tried} tried)")]
    NoAnswer { tried: usize },
}

/// The upstream nameservers and how long each is given.
#[derive(Debug, Clone)]
pub struct Upstreams {
    pub servers: Vec<SocketAddr>,
    pub timeout: Duration,
}

/// A query id nobody on the path can guess from the last one.
fn random_id() -> u16 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    (hasher.finish() & 0xffff) as u16
}

impl Upstreams {
    /// The first upstream's answer to `query`.
    pub async fn exchange(
        &self,
        query: &Query,
        recursion_desired: bool,
    ) -> Result<Message, ForwardError> {
        if self.servers.is_empty() {
            return Err(ForwardError::NoUpstream);
        }
        for server in &self.servers {
            let mut message = Message::new(random_id(), MessageType::Query, OpCode::Query);
            message.metadata.recursion_desired = recursion_desired;
            message.add_query(query.clone());
            let deadline = Instant::now() + self.timeout;
            match tokio::time::timeout_at(deadline, ask(*server, &message, deadline)).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(error)) => {
                    tracing::debug!(%server, %error, "upstream nameserver failed");
                }
                Err(_) => {
                    tracing::debug!(%server, timeout = ?self.timeout, "upstream nameserver timed out")
                }
            }
        }
        Err(ForwardError::NoAnswer {
            tried: self.servers.len(),
        })
    }
}

/// `message` to `server` over UDP; again over TCP when the answer is truncated.
async fn ask(server: SocketAddr, message: &Message, deadline: Instant) -> std::io::Result<Message> {
    let invalid =
        |e: hickory_proto::ProtoError| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let bytes = message.to_vec().map_err(invalid)?;
    let local: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(server).await?;
    socket.send(&bytes).await?;
    let mut buf = vec![0u8; 4096];
    let answer = loop {
        let n = socket.recv(&mut buf).await?;
        // Anything that is not the answer to this question (a late answer to an earlier
        // one, a spoofing attempt) is dropped and the wait goes on.
        match Message::from_vec(&buf[..n]) {
            Ok(answer) if answers(&answer, message) => break answer,
            _ => continue,
        }
    };
    if !answer.metadata.truncation {
        return Ok(answer);
    }
    let mut tcp = tokio::time::timeout_at(deadline, TcpStream::connect(server))
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)??;
    let len = u16::try_from(bytes.len()).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    tcp.write_all(&len.to_be_bytes()).await?;
    tcp.write_all(&bytes).await?;
    let len = tcp.read_u16().await?;
    let mut buf = vec![0u8; usize::from(len)];
    tcp.read_exact(&mut buf).await?;
    let answer = Message::from_vec(&buf)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    if answers(&answer, message) {
        Ok(answer)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the TCP answer does not match the question",
        ))
    }
}

/// Whether `answer` answers `question` (same id, a response, the same question).
fn answers(answer: &Message, question: &Message) -> bool {
    answer.metadata.id == question.metadata.id
        && answer.metadata.message_type == MessageType::Response
        && answer.queries == question.queries
}
