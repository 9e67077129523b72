//! Which device a worker runs on (`cpu` or `cuda:N`), libtorch thread settings, and the
//! report printed by `dmqsm-worker devices`.

use crate::error::{Result, WorkerError};
use serde::Serialize;
use std::fmt;
use std::str::FromStr;

/// A compute device, parsed from `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU (libtorch intra-op threads, see [`configure_threads`]).
    Cpu,
    /// CUDA device with this ordinal.
    Cuda(usize),
}

impl DeviceSpec {
    /// The tch device.
    pub fn to_tch(self) -> tch::Device {
        match self {
            Self::Cpu => tch::Device::Cpu,
            Self::Cuda(i) => tch::Device::Cuda(i),
        }
    }

    /// Errors unless libtorch can use this device (CUDA built in, driver present, ordinal
    /// below the device count).
    pub fn check_available(self) -> Result<()> {
        match self {
            Self::Cpu => Ok(()),
            Self::Cuda(i) => {
                if !tch::Cuda::is_available() {
                    return Err(WorkerError::Config(format!(
                        "device cuda:{i} requested but libtorch sees no CUDA device \
                         (run `dmqsm-worker devices`)"
                    )));
                }
                let count = tch::Cuda::device_count().max(0) as usize;
                if i >= count {
                    return Err(WorkerError::Config(format!(
                        "device cuda:{i} requested but only {count} CUDA device(s) are visible"
                    )));
                }
                Ok(())
            }
        }
    }

    /// True for CUDA devices.
    pub fn is_cuda(self) -> bool {
        matches!(self, Self::Cuda(_))
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = WorkerError;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        if s == "cpu" {
            return Ok(Self::Cpu);
        }
        if s == "cuda" {
            return Ok(Self::Cuda(0));
        }
        if let Some(n) = s.strip_prefix("cuda:") {
            return n.parse::<usize>().map(Self::Cuda).map_err(|_| {
                WorkerError::Config(format!("device '{s}': the CUDA ordinal must be a number"))
            });
        }
        Err(WorkerError::Config(format!(
            "device '{s}' is not one of cpu, cuda, cuda:N"
        )))
    }
}

/// Sets libtorch's intra-op thread count for the *calling* thread.
///
/// With OpenMP builds the setting is per OS thread, so every thread that runs a model
/// (the worker's executor thread, a training loop) calls this first. `None` leaves
/// libtorch's default (one thread per physical core). Results of our models do not
/// depend on the thread count (checked in the tests), but speed does.
pub fn configure_threads(threads: Option<usize>) {
    if let Some(n) = threads.filter(|&n| n > 0) {
        tch::set_num_threads(n as i32);
    }
}

/// What libtorch sees on this machine, printed by `dmqsm-worker devices`.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceReport {
    /// libtorch version the worker was built against (from the PyTorch package).
    pub libtorch_version: String,
    /// `tch::Cuda::is_available()`.
    pub cuda_available: bool,
    /// Number of visible CUDA devices.
    pub cuda_device_count: i64,
    /// cuDNN usable.
    pub cudnn_available: bool,
    /// cuDNN version (0 when absent).
    pub cudnn_version: i64,
    /// CUDA runtime version (0 when absent).
    pub cudart_version: i64,
    /// The libtorch we link is a CUDA build (libtorch_cuda linked with --no-as-needed).
    pub libtorch_cuda_build: bool,
    /// `at::hasCUDA()`: the CUDA runtime is usable (driver and device present).
    pub has_cuda_runtime: bool,
    /// MKL available.
    pub mkl: bool,
    /// oneDNN (MKL-DNN) available.
    pub mkldnn: bool,
    /// OpenMP available.
    pub openmp: bool,
    /// Intra-op threads of the calling thread.
    pub intra_op_threads: i32,
    /// Inter-op threads.
    pub inter_op_threads: i32,
}

impl DeviceReport {
    /// Queries libtorch.
    pub fn collect() -> Self {
        let cuda_available = tch::Cuda::is_available();
        Self {
            libtorch_version: env!("DMQSM_LIBTORCH_VERSION").to_string(),
            cuda_available,
            cuda_device_count: tch::Cuda::device_count(),
            cudnn_available: tch::Cuda::cudnn_is_available(),
            cudnn_version: if cuda_available {
                tch::utils::version_cudnn()
            } else {
                0
            },
            cudart_version: if cuda_available {
                tch::utils::version_cudart()
            } else {
                0
            },
            libtorch_cuda_build: env!("DMQSM_LIBTORCH_CUDA") == "true",
            has_cuda_runtime: tch::utils::has_cuda(),
            mkl: tch::utils::has_mkl(),
            mkldnn: tch::utils::has_mkldnn(),
            openmp: tch::utils::has_openmp(),
            intra_op_threads: tch::get_num_threads(),
            inter_op_threads: tch::get_num_interop_threads(),
        }
    }
}

impl fmt::Display for DeviceReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "libtorch           {}", self.libtorch_version)?;
        writeln!(f, "CUDA build         {}", self.libtorch_cuda_build)?;
        writeln!(f, "CUDA runtime ok    {}", self.has_cuda_runtime)?;
        writeln!(f, "CUDA available     {}", self.cuda_available)?;
        writeln!(f, "CUDA devices       {}", self.cuda_device_count)?;
        writeln!(
            f,
            "cuDNN              {} (version {})",
            self.cudnn_available, self.cudnn_version
        )?;
        writeln!(f, "CUDA runtime       {}", self.cudart_version)?;
        writeln!(f, "MKL                {}", self.mkl)?;
        writeln!(f, "oneDNN             {}", self.mkldnn)?;
        writeln!(f, "OpenMP             {}", self.openmp)?;
        writeln!(f, "intra-op threads   {}", self.intra_op_threads)?;
        write!(f, "inter-op threads   {}", self.inter_op_threads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("CUDA".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        let err = "gpu".parse::<DeviceSpec>().unwrap_err().to_string();
        assert!(err.contains("'gpu'"), "{err}");
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert_eq!(DeviceSpec::Cuda(1).to_string(), "cuda:1");
    }
}
