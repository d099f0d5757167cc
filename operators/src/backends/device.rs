//! Devices a model runs on (`--device`, `--devices`): one parser for both,
//! and the round-robin assignment of devices to timely workers.
//!
//! | name | backend | cargo feature |
//! |---|---|---|
//! | `cpu` | burn's ndarray with leverflow's host kernels | (default) |
//! | `cuda`, `cuda:N` | burn's CUDA backend, NVIDIA GPU `N` | `cuda` |
//! | `wgpu` | burn's wgpu backend on the best adapter wgpu finds (Vulkan, Metal, DX12; a software Vulkan device such as Mesa's lavapipe when there is no GPU) | `wgpu` |
//! | `wgpu:N` | burn's wgpu backend on discrete GPU `N` | `wgpu` |

use std::fmt;

/// A device name: `cpu`, `cuda:N` (`cuda` alone is `cuda:0`), `wgpu` (the
/// best adapter) or `wgpu:N` (discrete GPU `N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// CPU (burn's ndarray backend with leverflow's host kernels).
    Cpu,
    /// CUDA device index (needs a build with the `cuda` feature).
    Cuda(usize),
    /// A wgpu adapter (needs a build with the `wgpu` feature).
    Wgpu(WgpuAdapter),
}

/// Which wgpu adapter a [`Device::Wgpu`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WgpuAdapter {
    /// `wgpu`: the adapter wgpu ranks best (a high-power GPU first, else an
    /// integrated GPU, else a software device).
    Default,
    /// `wgpu:N`: the `N`-th discrete GPU.
    Discrete(usize),
}

/// The backend family of a device: the devices of one process must all be
/// of one kind (one burn backend per process).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// `cpu`.
    Cpu,
    /// `cuda:N`.
    Cuda,
    /// `wgpu`, `wgpu:N`.
    Wgpu,
}

impl Device {
    /// The backend family of the device.
    pub fn kind(&self) -> DeviceKind {
        match self {
            Device::Cpu => DeviceKind::Cpu,
            Device::Cuda(_) => DeviceKind::Cuda,
            Device::Wgpu(_) => DeviceKind::Wgpu,
        }
    }
}

/// A device name that is not `cpu`, `cuda:N`, `wgpu` or `wgpu:N`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{given:?} is not a device (expected cpu, cuda:N, wgpu or wgpu:N)")]
pub struct BadDevice {
    /// The name given.
    pub given: String,
}

impl std::str::FromStr for Device {
    type Err = BadDevice;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s == "cpu" {
            return Ok(Device::Cpu);
        }
        if s == "cuda" {
            return Ok(Device::Cuda(0));
        }
        if s == "wgpu" {
            return Ok(Device::Wgpu(WgpuAdapter::Default));
        }
        let index = |prefix: &str| {
            s.strip_prefix(prefix)
                .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|n| n.parse::<usize>().ok())
        };
        index("cuda:")
            .map(Device::Cuda)
            .or_else(|| index("wgpu:").map(|i| Device::Wgpu(WgpuAdapter::Discrete(i))))
            .ok_or_else(|| BadDevice {
                given: s.to_string(),
            })
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
            Device::Wgpu(WgpuAdapter::Default) => f.write_str("wgpu"),
            Device::Wgpu(WgpuAdapter::Discrete(i)) => write!(f, "wgpu:{i}"),
        }
    }
}

/// Parses a comma-separated device list (spaces ignored; repeats allowed,
/// to put several workers on one device).
pub fn parse_devices(spec: &str) -> Result<Vec<Device>, BadDevice> {
    spec.split(',').map(str::parse).collect()
}

/// The device of each local worker of process `process_index`: round robin
/// over `devices` by global worker index (`process_index *
/// workers_per_process + w`), so processes sharing a host with the same
/// list spread over its devices, and a list as long as the workers maps
/// worker `w` to device `w`. An empty list gives `cpu`.
pub fn devices_for_workers(
    devices: &[Device],
    workers_per_process: usize,
    process_index: usize,
) -> Vec<Device> {
    (0..workers_per_process)
        .map(|w| {
            if devices.is_empty() {
                Device::Cpu
            } else {
                devices[(process_index * workers_per_process + w) % devices.len()]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print() {
        assert_eq!("cpu".parse(), Ok(Device::Cpu));
        assert_eq!("cuda".parse(), Ok(Device::Cuda(0)));
        assert_eq!(" cuda:3 ".parse(), Ok(Device::Cuda(3)));
        assert_eq!(Device::Cuda(3).to_string(), "cuda:3");
        assert_eq!("wgpu".parse(), Ok(Device::Wgpu(WgpuAdapter::Default)));
        assert_eq!("wgpu:2".parse(), Ok(Device::Wgpu(WgpuAdapter::Discrete(2))));
        for name in ["wgpu", "wgpu:2"] {
            assert_eq!(name.parse::<Device>().unwrap().to_string(), name);
        }
        assert_eq!(Device::Wgpu(WgpuAdapter::Default).kind(), DeviceKind::Wgpu);
        for bad in [
            "gpu", "cuda:", "cuda:x", "cuda:-1", "", "wgpu:", "wgpu:a", "wgpu0",
        ] {
            assert!(bad.parse::<Device>().is_err(), "{bad}");
        }
        let list = parse_devices("cuda:0, cuda:1,cpu").unwrap();
        assert_eq!(list, vec![Device::Cuda(0), Device::Cuda(1), Device::Cpu]);
        assert!(parse_devices("cuda:0,tpu")
            .unwrap_err()
            .to_string()
            .contains("tpu"));
    }

    #[test]
    fn devices_round_robin() {
        let d = parse_devices("cuda:0,cuda:1,cuda:2").unwrap();
        assert_eq!(
            devices_for_workers(&d, 2, 1),
            vec![Device::Cuda(2), Device::Cuda(0)]
        );
        assert_eq!(devices_for_workers(&[], 2, 0), vec![Device::Cpu; 2]);
        let w = parse_devices("wgpu:0,wgpu:1").unwrap();
        assert_eq!(
            devices_for_workers(&w, 3, 0),
            vec![
                Device::Wgpu(WgpuAdapter::Discrete(0)),
                Device::Wgpu(WgpuAdapter::Discrete(1)),
                Device::Wgpu(WgpuAdapter::Discrete(0))
            ]
        );
    }
}
