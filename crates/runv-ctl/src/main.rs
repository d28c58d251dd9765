//! runv-ctl: boots a pod VM to prove a node is ready, and reports on it.

use std::{path::PathBuf, process::ExitCode, time::Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use runv_agent_client::ConnectOptions;
use runv_config::{Config, HypervisorKind, DEFAULT_CONFIG_PATH};
use runv_hypervisor::{host::builtin_usable, KvmSupport};
use runv_sandbox::PodVm;

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// The runv configuration file [default: /etc/runv/runv.toml when it
    /// exists, else built-in defaults]
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a pod VM, print the guest's details and the boot timeline, and
    /// shut it down.
    Boot {
        /// Keep the guest console log at this path (else it is discarded)
        #[arg(long)]
        console_log: Option<PathBuf>,
        /// Keep the VM running after the report until stdin closes, so
        /// that its processes and memory can be looked at
        #[arg(long)]
        hold: bool,
        /// Print the report as one JSON object instead of text
        #[arg(long)]
        json: bool,
    },
    /// Show what this host offers runv: KVM, accelerator, boot files.
    Check,
    /// Print the hypervisor this host should run ("builtin" where its KVM
    /// can boot the configured guest kernel, else "qemu"), and why on stderr.
    PickHypervisor,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load_or_default(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("runv-ctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| config.log_level.as_str().into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Boot {
            console_log,
            hold,
            json,
        } => boot(&config, console_log, hold, json),
        Command::Check => {
            check(&config, cli.config.as_deref());
            Ok(())
        }
        Command::PickHypervisor => {
            pick_hypervisor(&config);
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("runv-ctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn boot(
    config: &Config,
    console_log: Option<PathBuf>,
    hold: bool,
    json: bool,
) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir().context("cannot create a scratch directory")?;
    let console = console_log.unwrap_or_else(|| scratch.path().join("console.log"));
    let id = format!("runv-ctl-{}", std::process::id());
    let spec = PodVm::spec(config, &id, console.clone());
    let connect = ConnectOptions::new(config.vm.agent_timeout());

    let vm = PodVm::boot(config, spec, &connect).await?;
    let start = vm.start_info().clone();
    let details = vm.agent().guest_details().await?;
    let timeline = vm.boot_timeline(&details);
    if json {
        // The builtin VMM runs in this process; QEMU and its helpers do not.
        let mut processes = vec![std::process::id()];
        processes.extend(vm.pids());
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        let report = serde_json::json!({
            "hypervisor": config.hypervisor.to_string(),
            "accel": start.accel.to_string(),
            "accel_reason": start.accel_reason,
            "kernel": details.kernel_release,
            "memory_mib": details.memory_total_bytes / (1024 * 1024),
            "online_cpus": details.online_cpus,
            "processes": processes,
            "hypervisor_spawn_ms": ms(timeline.hypervisor_spawn),
            "guest_kernel_to_init_ms": timeline.guest.map(|g| ms(g.kernel_to_init)),
            "guest_init_to_agent_ready_ms": timeline.guest.map(|g| ms(g.init_to_agent_ready)),
            "agent_ready_ms": ms(timeline.agent_ready),
            "first_rpc_ms": ms(timeline.first_rpc),
        });
        println!("{report}");
    } else {
        print_report(config, &start, &details, &timeline);
    }
    if hold {
        use std::io::Write;
        std::io::stdout().flush()?;
        wait_for_stdin_eof().await;
    }
    let booted_for = vm.age();
    let shutdown = vm.shutdown().await;
    if !json {
        println!(
            "shutdown                  {:>9.1} ms  ({}{})",
            shutdown.duration.as_secs_f64() * 1000.0,
            shutdown.exit,
            if shutdown.forced { ", forced" } else { "" }
        );
        println!(
            "total                     {:>9.1} ms",
            (booted_for + shutdown.duration).as_secs_f64() * 1000.0
        );
    }
    if shutdown.forced {
        anyhow::bail!("the guest did not power off when asked and was killed");
    }
    Ok(())
}

fn print_report(
    config: &Config,
    start: &runv_hypervisor::StartInfo,
    details: &runv_protocol::agent::GuestDetails,
    timeline: &runv_sandbox::BootTimeline,
) {
    println!(
        "runv: booted a {} VM with {} ({})",
        config.hypervisor, start.accel, start.accel_reason
    );
    println!("guest:");
    println!("  kernel                  {}", details.kernel_release);
    println!(
        "  memory                  {} MiB",
        details.memory_total_bytes / (1024 * 1024)
    );
    println!("  online CPUs             {}", details.online_cpus);
    println!(
        "  agent                   runv-agent {} (protocol {})",
        details.agent_version, details.protocol_version
    );
    println!("boot timeline:");
    println!("{timeline}");
}

/// Returns once stdin is closed (or unreadable): `--hold`'s release.
async fn wait_for_stdin_eof() {
    let _ =
        tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink()))
            .await;
}

fn check(config: &Config, config_path: Option<&std::path::Path>) {
    let started = Instant::now();
    let kvm = KvmSupport::probe();
    println!("config:      {}", config_origin(config_path));
    println!("hypervisor:  {}", config.hypervisor);
    match kvm.why_not_usable() {
        None => println!("kvm:         usable ({kvm:?})"),
        Some(reason) => println!("kvm:         not usable: {reason}"),
    }
    match builtin_usable(&kvm, config.builtin.pvm_guest_kernel) {
        Ok(reason) => println!("builtin:     usable ({reason})"),
        Err(why) => println!("builtin:     not usable: {why}"),
    }
    match runv_hypervisor::host::choose_accel(config.qemu.accel, config.qemu.allow_tcg, &kvm) {
        Ok((accel, reason)) => {
            println!("qemu accel:  {accel} ({reason})");
            if accel == runv_hypervisor::Accel::Tcg {
                println!(
                    "             warning: {} (qemu.allow_tcg = true)",
                    runv_hypervisor::host::TCG_NOT_A_BOUNDARY
                );
            }
        }
        Err(e) => println!("qemu accel:  error: {e}"),
    }
    let root_image = config
        .builtin
        .root_image
        .iter()
        .map(|path| ("root image", path));
    let boot_files = [
        ("kernel", &config.vm.kernel),
        ("initramfs", &config.vm.initramfs),
    ];
    for (what, path) in boot_files.into_iter().chain(root_image) {
        let state = if path.is_file() { "ok" } else { "MISSING" };
        println!("{what:<12} {} ({state})", path.display());
    }
    for (what, program) in [
        ("qemu", &config.qemu.binary),
        ("vhost-vsock", &config.qemu.vhost_vsock_binary),
        ("virtiofsd", &config.qemu.virtiofsd_binary),
    ] {
        match runv_hypervisor::process::find_executable(program) {
            Some(found) => println!("{what:<12} {} (ok)", found.display()),
            None => println!("{what:<12} {} (MISSING)", program.display()),
        }
    }
    tracing::debug!(elapsed = ?started.elapsed(), "host checked");
}

fn pick_hypervisor(config: &Config) {
    match builtin_usable(&KvmSupport::probe(), config.builtin.pvm_guest_kernel) {
        Ok(reason) => {
            eprintln!("runv-ctl: builtin: {reason}");
            println!("{}", HypervisorKind::Builtin);
        }
        Err(why) => {
            eprintln!("runv-ctl: not builtin: {why}");
            println!("{}", HypervisorKind::Qemu);
        }
    }
}

fn config_origin(config_path: Option<&std::path::Path>) -> String {
    if let Some(path) = config_path {
        path.display().to_string()
    } else if std::path::Path::new(DEFAULT_CONFIG_PATH).exists() {
        DEFAULT_CONFIG_PATH.to_owned()
    } else {
        "built-in defaults".to_owned()
    }
}
