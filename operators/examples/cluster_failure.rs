//! Experiment: how a multi-process timely run behaves when a process dies
//! or is unreachable, with timely's own connection set-up (`timely`) and
//! with leverflow's [`execute_cluster`] (`leverflow`).
//!
//! ```text
//! cargo run -p leverflow-operators --example cluster_failure -- MODE INDEX HOST:PORT...
//! ```
//!
//! Every process runs a never-ending dataflow (one round every 100 ms, data
//! exchanged between all workers); kill one process (`kill -9`) and watch
//! how long the others take to stop, and what they say.  Each process
//! prints one line `process I: returned after S s: RESULT` on stderr.

use std::time::{Duration, Instant};

use leverflow_operators::dataflow::{execute_cluster, ClusterConfig, ClusterTimeouts};
use timely::dataflow::operators::{Exchange, Input, Probe};
use timely::dataflow::{InputHandleVec, ProbeHandle};

fn work(worker: &mut timely::worker::Worker) -> u64 {
    let mut input = InputHandleVec::<u64, u64>::new();
    let probe = ProbeHandle::new();
    worker.dataflow(|scope| {
        scope
            .input_from(&mut input)
            .container::<Vec<u64>>()
            .exchange(|x: &u64| *x)
            .probe_with(&probe);
    });
    let mut round = 0u64;
    loop {
        input.send(round + worker.index() as u64);
        round += 1;
        input.advance_to(round);
        while probe.less_than(&round) {
            worker.step();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!("usage: cluster_failure timely|leverflow INDEX HOST:PORT...");
        std::process::exit(2);
    }
    let mode = args[0].clone();
    let index: usize = args[1].parse().expect("INDEX");
    let hosts: Vec<String> = args[2..].to_vec();
    let config = ClusterConfig::new(hosts.len(), index, hosts, 2).expect("config");
    let start = Instant::now();
    let result: Result<Vec<u64>, String> = match mode.as_str() {
        "timely" => match timely::execute(config.timely_config(), work) {
            Ok(guards) => guards.join().into_iter().collect(),
            Err(e) => Err(e),
        },
        _ => execute_cluster(
            &config,
            &ClusterTimeouts {
                connect: Duration::from_secs(5),
                ..Default::default()
            },
            work,
        ),
    };
    eprintln!(
        "process {index}: returned after {:.2} s: {result:?}",
        start.elapsed().as_secs_f64()
    );
    std::process::exit(if result.is_ok() { 0 } else { 1 });
}
