//! The picker's cost per pick, next to two baselines, at 3 to 10,000 endpoints.
//!
//! Full run (criterion's defaults: 3 s warm-up, 5 s measurement, 100 samples per benchmark):
//!
//! ```sh
//! cargo bench --locked -p kubegrpc --bench picker
//! ```
//!
//! Quick run (each benchmark for about a second; the mode for CI, which checks only that it runs):
//!
//! ```sh
//! cargo bench --locked -p kubegrpc --bench picker -- --warm-up-time 0.2 --measurement-time 0.5 --sample-size 10
//! ```
//!
//! One criterion group per endpoint count (`picker/3` ... `picker/10000`), each with:
//!
//! - `kubegrpc/{equal,unequal}/1t`: one [`Picker::pick`] on a picker over N endpoints, built
//!   once outside the timing, as the channel holds it for every request. Equal weights: all 100;
//!   unequal: weights cycling 1, 2, ..., 10 over the endpoints. The items are `Arc`s, like the
//!   channel's `Picker<Arc<Endpoint>>`; the returned reference is passed to `black_box`, not
//!   cloned (the channel's `Arc` clone and its `ArcSwap` load of the picker are not timed).
//! - `atomic_rr/1t`: the floor: `items[next.fetch_add(1, Relaxed) % n]` over a `Vec` of N.
//! - `p2c/1t`: tower's `balance::p2c::Balance` over N always-ready services (`service_fn`
//!   wrapped in `load::Constant`, as tonic's `balance_list` wraps its connections). Timed:
//!   one `poll_ready` + one `call`, the request future dropped unpolled. That is what one request
//!   costs p2c: `poll_ready` re-admits the service called last time (`call` moves it to the
//!   pending set) and makes the p2c choice between two random ready services; `call` hands the
//!   request over. A repeated `poll_ready` without `call` would time nothing, since the chosen
//!   service stays chosen. p2c has no weights: its figure is the same for both weightings.
//! - `.../2t`: two threads picking at once. Each thread does `iters` picks, starting together
//!   at a barrier; the time reported for `iters` is the later thread's elapsed time, so the
//!   figure is **ns per pick per thread while the other thread picks too** (wall time, not CPU
//!   time summed over the threads). kubegrpc and the atomic round robin share one picker /
//!   one counter between the threads, as all requests on one channel do. A `Balance` is
//!   `&mut self` and cannot be shared without a `tower::buffer` (a channel and a task), so
//!   `p2c/2t` gives each thread a `Balance` of its own: no sharing at all, its best case.
//!   `kubegrpc/equal/2t-private` does the same for the picker (one picker per thread), which
//!   separates what sharing costs from what two busy cores cost.
//!
//! `black_box` is `std::hint::black_box`.

#![forbid(unsafe_code)]

use std::{
    convert::Infallible,
    future::{Ready, ready},
    hint::black_box,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc, Barrier,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll, Waker},
    thread,
    time::{Duration, Instant},
};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use kubegrpc::internals::Picker;
use tower::{Service, balance::p2c::Balance, discover::ServiceList, load::Constant, service_fn, util::ServiceFn};

const SIZES: [usize; 5] = [3, 100, 1_000, 5_000, 10_000];

type Item = Arc<SocketAddr>;

fn items(n: usize) -> Vec<Item> {
    (0..n)
        .map(|i| {
            let ip = Ipv4Addr::from(0x0afa_0000 + i as u32);
            Arc::new(SocketAddr::from((ip, 50051)))
        })
        .collect()
}

fn equal_weights(n: usize) -> Vec<u32> {
    vec![100; n]
}

fn unequal_weights(n: usize) -> Vec<u32> {
    (0..n).map(|i| 1 + (i % 10) as u32).collect()
}

/// The start offset the pool gives a new picker: arbitrary, so not 0.
const START: usize = 12_345;

/// The floor: a plain atomic round robin over a slice.
struct RoundRobin {
    items: Vec<Item>,
    next: AtomicUsize,
}

impl RoundRobin {
    fn new(items: Vec<Item>) -> Self {
        Self {
            items,
            next: AtomicUsize::new(START),
        }
    }

    #[inline]
    fn pick(&self) -> &Item {
        &self.items[self.next.fetch_add(1, Ordering::Relaxed) % self.items.len()]
    }
}

type Endpoint = Constant<ServiceFn<fn(()) -> Ready<Result<(), Infallible>>>, u32>;
type P2c = Balance<ServiceList<Vec<Endpoint>>, ()>;

fn answer(_: ()) -> Ready<Result<(), Infallible>> {
    ready(Ok(()))
}

/// A p2c balance over `n` always-ready services, polled once so that all of them are ready.
fn p2c(n: usize) -> P2c {
    let answer: fn(()) -> Ready<Result<(), Infallible>> = answer;
    let services: Vec<Endpoint> = (0..n).map(|_| Constant::new(service_fn(answer), 0)).collect();
    let mut balance = Balance::new(ServiceList::new(services));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(matches!(balance.poll_ready(&mut cx), Poll::Ready(Ok(()))));
    assert_eq!(balance.len(), n);
    balance
}

#[inline]
fn p2c_request(balance: &mut P2c, cx: &mut Context<'_>) {
    match balance.poll_ready(cx) {
        Poll::Ready(Ok(())) => {}
        _ => unreachable!("every service is always ready"),
    }
    // The request future is dropped unpolled.
    let _request = black_box(balance.call(()));
}

/// Runs `work(_, iters)` on two threads released together at a barrier, one with `a` and one
/// with `b`; returns the later thread's elapsed time (barrier to its last pick).
fn two_threads<S: Send>(iters: u64, a: S, b: S, work: impl Fn(S, u64) + Sync) -> Duration {
    let barrier = Barrier::new(2);
    let run = |state: S| {
        barrier.wait();
        let started = Instant::now();
        work(state, iters);
        started.elapsed()
    };
    let run = &run;
    thread::scope(|scope| {
        let other = scope.spawn(move || run(b));
        let mine = run(a);
        mine.max(other.join().expect("the other picking thread"))
    })
}

/// `iters` picks, each passed to `black_box`.
fn picks(picker: &Picker<Item>, iters: u64) {
    for _ in 0..iters {
        black_box(picker.pick());
    }
}

fn bench(c: &mut Criterion) {
    for n in SIZES {
        let mut group = c.benchmark_group(format!("picker/{n}"));

        for (weighting, weights) in [("equal", equal_weights(n)), ("unequal", unequal_weights(n))] {
            let picker = Picker::new(items(n), &weights, START);
            group.bench_function(BenchmarkId::new("kubegrpc", format!("{weighting}/1t")), |b| {
                b.iter(|| black_box(picker.pick()));
            });
            group.bench_function(BenchmarkId::new("kubegrpc", format!("{weighting}/2t")), |b| {
                b.iter_custom(|iters| two_threads(iters, &picker, &picker, picks));
            });
        }

        let mine = Picker::new(items(n), &equal_weights(n), START);
        let theirs = Picker::new(items(n), &equal_weights(n), START + 1);
        group.bench_function(BenchmarkId::new("kubegrpc", "equal/2t-private"), |b| {
            b.iter_custom(|iters| two_threads(iters, &mine, &theirs, picks));
        });

        let round_robin = RoundRobin::new(items(n));
        group.bench_function(BenchmarkId::new("atomic_rr", "1t"), |b| {
            b.iter(|| black_box(round_robin.pick()));
        });
        group.bench_function(BenchmarkId::new("atomic_rr", "2t"), |b| {
            b.iter_custom(|iters| {
                two_threads(iters, &round_robin, &round_robin, |r: &RoundRobin, iters| {
                    for _ in 0..iters {
                        black_box(r.pick());
                    }
                })
            });
        });

        let mut balance = p2c(n);
        let mut cx = Context::from_waker(Waker::noop());
        group.bench_function(BenchmarkId::new("p2c", "1t"), |b| {
            b.iter(|| p2c_request(&mut balance, &mut cx));
        });
        let mut other = p2c(n);
        group.bench_function(BenchmarkId::new("p2c", "2t"), |b| {
            b.iter_custom(|iters| {
                let work = |balance: &mut P2c, iters: u64| {
                    let mut cx = Context::from_waker(Waker::noop());
                    for _ in 0..iters {
                        p2c_request(balance, &mut cx);
                    }
                };
                two_threads(iters, &mut balance, &mut other, work)
            });
        });

        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
