//! Windows service entry (thin): the Service Control Manager's Stop becomes the same shutdown
//! future that SIGTERM is elsewhere, so the drain path is the one the portable tests exercise.
//! Not compiled on this project's Linux CI (no Windows target here).

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use windows_service::service::{
    ServiceControl, ServiceControlAccept, ServiceExitCode, ServiceState, ServiceStatus, ServiceType,
};
use windows_service::service_control_handler::{self, ServiceControlHandlerResult};
use windows_service::{define_windows_service, service_dispatcher};

use crate::app::{self, Mode};
use crate::config::{self, FlagOverrides};

const SERVICE_NAME: &str = "IdentityMesh";
static CONFIG: OnceLock<PathBuf> = OnceLock::new();

define_windows_service!(ffi_service_main, service_main);

pub fn run(config: PathBuf) -> std::process::ExitCode {
    let _ = CONFIG.set(config);
    match service_dispatcher::start(SERVICE_NAME, ffi_service_main) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot start as a Windows service: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn service_main(_args: Vec<OsString>) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let tx = std::sync::Mutex::new(Some(tx));
    let handler = move |event| match event {
        ServiceControl::Stop | ServiceControl::Shutdown => {
            if let Some(tx) = tx.lock().ok().and_then(|mut t| t.take()) {
                let _ = tx.send(());
            }
            ServiceControlHandlerResult::NoError
        }
        ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
        _ => ServiceControlHandlerResult::NotImplemented,
    };
    let Ok(status) = service_control_handler::register(SERVICE_NAME, handler) else {
        return;
    };
    let set = |state, accept| {
        let _ = status.set_service_status(ServiceStatus {
            service_type: ServiceType::OWN_PROCESS,
            current_state: state,
            controls_accepted: accept,
            exit_code: ServiceExitCode::Win32(0),
            checkpoint: 0,
            wait_hint: Duration::from_secs(30),
            process_id: None,
        });
    };
    set(
        ServiceState::Running,
        ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN,
    );
    let file = CONFIG.get().cloned();
    let result = config::load(file.as_deref(), std::env::vars(), &FlagOverrides::default())
        .map_err(anyhow::Error::from)
        .and_then(|cfg| {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(app::run(Mode::Standalone, cfg, async {
                let _ = rx.await;
            }))
        });
    if let Err(e) = result {
        tracing::error!("{e:#}");
    }
    set(ServiceState::Stopped, ServiceControlAccept::empty());
}
