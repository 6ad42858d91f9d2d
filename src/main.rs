//! The `shardgate` binary: command line, logging, and the run/check/demo commands.
//! All behaviour lives in the library; this file only wires it to a process.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use shardgate::config::Config;
use shardgate::shard_map::ShardMap;

#[derive(Parser)]
#[command(
    name = "shardgate",
    version,
    about = "PostgreSQL sharding and read/write-splitting proxy"
)]
struct Cli {
    /// Server settings file (shardgate.yaml).
    #[arg(long, env = "SHARDGATE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Log format on stderr; filter with RUST_LOG.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config and shard map, print a summary; exit 1 on error.
    Check,
    /// Start a local cluster (primary + streaming replica) and the proxy in front of it.
    Demo,
    /// Print what editing the shard map from OLD to NEW would move (a dry run). With
    /// --config, row estimates come from the source shards' statistics.
    Plan { old: PathBuf, new: PathBuf },
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load(path: Option<PathBuf>) -> anyhow::Result<(Config, ShardMap)> {
    let path =
        path.context("no config file: pass --config shardgate.yaml or set SHARDGATE_CONFIG")?;
    let config = Config::load(&path)?;
    let map = ShardMap::load(&config.shard_map)?;
    Ok((config, map))
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let result = match cli.command {
        Some(Command::Check) => check(cli.config),
        Some(Command::Demo) => shardgate::demo::run().map_err(Into::into),
        Some(Command::Plan { old, new }) => plan(cli.config, &old, &new),
        None => run(cli.config),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("shardgate: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn check(path: Option<PathBuf>) -> anyhow::Result<()> {
    let (config, map) = load(path)?;
    println!("config {}: OK", config.source.display());
    println!(
        "  listen {}  pool {:?} x{}  users {}",
        config.listen,
        config.pool.mode,
        config.pool.size,
        config.users.len()
    );
    println!(
        "shard map {} (version {}): OK",
        map.source.display(),
        map.version
    );
    println!(
        "  database {}  default shard {}",
        map.database, map.default_shard
    );
    for (name, shard) in &map.shards {
        let replicas: Vec<String> = shard.replicas.iter().map(|r| r.to_string()).collect();
        println!(
            "  shard {name}: primary {}  replicas [{}]",
            shard.primary,
            replicas.join(", ")
        );
    }
    let runtime = tokio::runtime::Runtime::new()?;
    let findings = runtime.block_on(shardgate::control::check::check_nodes(
        &config,
        &map,
        config.pool.connect_timeout,
    ));
    for finding in findings {
        match finding.warning {
            None => println!("  shard {} primary {}: OK", finding.shard, finding.node),
            Some(warning) => println!(
                "  WARNING shard {} primary {}: {warning}",
                finding.shard, finding.node
            ),
        }
    }
    Ok(())
}

fn plan(
    config: Option<PathBuf>,
    old: &std::path::Path,
    new: &std::path::Path,
) -> anyhow::Result<()> {
    use shardgate::reshard::plan;
    let old_map = ShardMap::load(old)?;
    let new_map = ShardMap::load(new)?;
    let moves = plan::diff(&old_map, &new_map)
        .with_context(|| format!("{} -> {}", old.display(), new.display()))?;
    let (added, removed) = plan::shard_changes(&old_map, &new_map);
    println!(
        "shard map version {} -> {}",
        old_map.version, new_map.version
    );
    for shard in &added {
        println!("  shard {shard}: added");
    }
    for shard in &removed {
        println!("  shard {shard}: removed");
    }
    if moves.is_empty() {
        println!("nothing moves: the edit applies at once on RELOAD");
        return Ok(());
    }
    for m in &moves.moves {
        for piece in &m.pieces {
            let tables: Vec<&str> = m.tables.iter().map(|(t, _)| t.as_str()).collect();
            println!(
                "  keyspace {}: {} moves {} -> {} (tables: {})",
                m.keyspace,
                plan::describe(m.axis, piece),
                piece.source,
                piece.target,
                tables.join(", ")
            );
        }
    }
    let Some(path) = config else {
        println!("(pass --config to estimate rows from the source shards' statistics)");
        return Ok(());
    };
    let config = Config::load(&path)?;
    let runtime = tokio::runtime::Runtime::new()?;
    let estimates = runtime.block_on(shardgate::reshard::estimates(&config, &old_map, &moves));
    let mut total = (0u64, 0u64);
    for (source, target, table, estimate) in estimates {
        match estimate {
            Ok((rows, bytes)) => {
                total.0 += rows;
                total.1 += bytes;
                println!("  {table} {source} -> {target}: about {rows} rows, {bytes} bytes");
            }
            Err(error) => println!("  {table} {source} -> {target}: no estimate ({error})"),
        }
    }
    println!("total: about {} rows, {} bytes", total.0, total.1);
    Ok(())
}

fn run(path: Option<PathBuf>) -> anyhow::Result<()> {
    let (config, map) = load(path)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(serve(config, map))
}

/// Runs until a signal: SIGTERM drains open transactions, SIGINT exits at once.
pub async fn serve(config: Config, map: ShardMap) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let handle = shardgate::app::start(&config, &map).await?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {
            tracing::info!("SIGTERM: draining open transactions");
            handle.shutdown();
            tokio::select! {
                _ = handle.wait() => {}
                _ = int.recv() => tracing::info!("SIGINT during drain: exiting now"),
            }
        }
        _ = int.recv() => tracing::info!("SIGINT: exiting now"),
    }
    Ok(())
}
