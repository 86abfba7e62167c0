//! Load generator for `scripts/bench-proxy`: an upstream server and three clients (bulk
//! throughput, request/response latency at a fixed rate, many idle connections). Each client
//! prints one line of `key=value` figures on stdout for the script to collect.
//!
//! The first byte a client sends picks the server's behaviour: `B` sink (count bytes until EOF,
//! answer the count as 8 bytes big-endian), `E` echo.

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser, Debug)]
#[command(about = "Load generator for the pass-through proxy benchmark")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Upstream server: sink or echo, chosen by each connection's first byte.
    Server {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Several streams writing as fast as they can; prints the delivered rate.
    Bulk {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 4)]
        streams: usize,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// One connection sending SIZE-byte requests at RATE per second and timing each echo.
    Rr {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 2000)]
        rate: u32,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 1024)]
        size: usize,
    },
    /// Opens CONNS connections, round-trips 1 KiB on each, prints `ready`, then holds them idle.
    Idle {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 10_000)]
        conns: usize,
        #[arg(long, default_value_t = 60)]
        hold_secs: u64,
    },
}

fn main() -> Result<()> {
    let args = Args::parse();
    proxy::raise_fd_limit().context("raising the open-file limit")?;
    match args.cmd {
        Cmd::Server { listen } => server(listen),
        Cmd::Bulk {
            to,
            streams,
            seconds,
        } => bulk(to, streams, Duration::from_secs_f64(seconds)),
        Cmd::Rr {
            to,
            rate,
            seconds,
            size,
        } => rr(to, rate, Duration::from_secs_f64(seconds), size),
        Cmd::Idle {
            to,
            conns,
            hold_secs,
        } => idle(to, conns, Duration::from_secs(hold_secs)),
    }
}

fn server(listen: SocketAddr) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(listen),
            socket2::Type::STREAM,
            None,
        )?;
        sock.set_reuse_address(true)?;
        sock.set_nonblocking(true)?;
        sock.bind(&listen.into())
            .with_context(|| format!("binding {listen}"))?;
        sock.listen(4096)?;
        let l = tokio::net::TcpListener::from_std(sock.into())?;
        println!("ready {listen}");
        loop {
            let (s, _) = match l.accept().await {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                if let Err(e) = serve(s).await {
                    eprintln!("server connection: {e}");
                }
            });
        }
    })
}

async fn serve(mut s: tokio::net::TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut mode = [0u8; 1];
    if s.read(&mut mode).await? == 0 {
        return Ok(());
    }
    match mode[0] {
        b'B' => {
            let mut buf = vec![0u8; 1 << 20];
            let mut total: u64 = 0;
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            s.write_all(&total.to_be_bytes()).await?;
            s.shutdown().await
        }
        b'E' => {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    return s.shutdown().await;
                }
                s.write_all(&buf[..n]).await?;
            }
        }
        other => Err(std::io::Error::other(format!("unknown mode byte {other}"))),
    }
}

fn connect(to: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect(to).with_context(|| format!("connecting to {to}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

fn bulk(to: SocketAddr, streams: usize, dur: Duration) -> Result<()> {
    let start = Instant::now();
    let deadline = start + dur;
    let workers: Vec<_> = (0..streams)
        .map(|_| {
            std::thread::spawn(move || -> Result<u64> {
                let mut s = connect(to)?;
                s.write_all(b"B")?;
                let chunk = vec![0x5au8; 1 << 20];
                while Instant::now() < deadline {
                    s.write_all(&chunk)?;
                }
                s.shutdown(Shutdown::Write)?;
                let mut count = [0u8; 8];
                s.read_exact(&mut count)
                    .context("reading the delivered count")?;
                Ok(u64::from_be_bytes(count))
            })
        })
        .collect();
    let mut delivered = 0u64;
    for w in workers {
        delivered += w.join().map_err(|_| anyhow::anyhow!("stream panicked"))??;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "bulk streams={streams} bytes={delivered} secs={secs:.3} gbps={:.2}",
        delivered as f64 * 8.0 / secs / 1e9
    );
    Ok(())
}

fn rr(to: SocketAddr, rate: u32, dur: Duration, size: usize) -> Result<()> {
    if rate == 0 {
        bail!("--rate must be at least 1");
    }
    let mut s = connect(to)?;
    s.write_all(b"E")?;
    let req = vec![0x42u8; size];
    let mut resp = vec![0u8; size];
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let warmup = 200usize;
    let total = warmup + (dur.as_secs_f64() * f64::from(rate)) as usize;
    let mut samples = Vec::with_capacity(total);
    let start = Instant::now();
    for i in 0..total {
        // Fixed schedule, not back-to-back: latency at a steady offered load.
        let due = start + interval * i as u32;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let t = Instant::now();
        s.write_all(&req)?;
        s.read_exact(&mut resp).context("reading the echo")?;
        if i >= warmup {
            samples.push(t.elapsed());
        }
    }
    samples.sort();
    let pct = |p: f64| {
        let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
        samples[i].as_secs_f64() * 1e6
    };
    println!(
        "rr n={} rate={rate} size={size} p50_us={:.1} p99_us={:.1} max_us={:.1}",
        samples.len(),
        pct(0.50),
        pct(0.99),
        pct(1.0)
    );
    Ok(())
}

fn idle(to: SocketAddr, conns: usize, hold: Duration) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut held = Vec::with_capacity(conns);
        let mut failed = 0usize;
        // Batches keep the SYN and accept queues from overflowing.
        for batch in (0..conns).collect::<Vec<_>>().chunks(500) {
            let tasks: Vec<_> = batch
                .iter()
                .map(|_| {
                    tokio::spawn(async move {
                        let mut s = tokio::net::TcpStream::connect(to).await?;
                        s.set_nodelay(true)?;
                        s.write_all(b"E").await?;
                        let msg = [7u8; 1024];
                        s.write_all(&msg).await?;
                        let mut back = [0u8; 1024];
                        s.read_exact(&mut back).await?;
                        Ok::<_, std::io::Error>(s)
                    })
                })
                .collect();
            for t in tasks {
                match t.await? {
                    Ok(s) => held.push(s),
                    Err(e) => {
                        failed += 1;
                        if failed <= 3 {
                            eprintln!("idle connection failed: {e}");
                        }
                    }
                }
            }
        }
        println!("ready conns={} failed={failed}", held.len());
        tokio::time::sleep(hold).await;
        Ok::<_, anyhow::Error>(())
    })
}
