//! Devices a model runs on (`--device`, `--devices`): one parser for both,
//! and the round-robin assignment of devices to timely workers.

use std::fmt;

/// A device name: `cpu` or `cuda:N` (`cuda` alone is `cuda:0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// CPU (burn's ndarray backend with leverflow's host kernels).
    Cpu,
    /// CUDA device index (needs a build with the `cuda` feature).
    Cuda(usize),
}

/// A device name that is not `cpu` or `cuda:N`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{given:?} is not a device (expected cpu or cuda:N)")]
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
        s.strip_prefix("cuda:")
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
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
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
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
    }
}
