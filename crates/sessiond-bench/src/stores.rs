//! The stores scenario: the same HTTP create and verify load on sessiond with each store
//! (embedded, and PostgreSQL, Redis, Redis Cluster where given), one after the other in one
//! run, with a bare axum handler as the ceiling of the HTTP stack.

use crate::http::{self, Store};
use crate::loadgen::LoadReport;
use crate::stats::{self, Latencies, Row};

/// One store's measurements.
#[derive(Debug)]
pub struct StoreResult {
    /// The store.
    pub store: Store,
    /// `POST /v1/sessions`: durable creates.
    pub create: LoadReport,
    /// `POST /v1/sessions/verify`.
    pub verify: LoadReport,
}

/// The outcome of the stores scenario.
#[derive(Debug)]
pub struct Report {
    /// The settings it ran with.
    pub settings: http::Settings,
    /// The bare axum handler (measured beside the embedded store's server).
    pub hello: LoadReport,
    /// Each store, the embedded one first.
    pub stores: Vec<StoreResult>,
}

impl Report {
    /// Failed or non-200 responses of every run.
    pub fn failures(&self) -> u64 {
        let runs = std::iter::once(&self.hello)
            .chain(self.stores.iter().flat_map(|s| [&s.create, &s.verify]));
        runs.map(|r| r.non_200 + r.errors).sum()
    }

    /// Prints the details, then a table of the stores side by side.
    pub fn print(&self) {
        let s = &self.settings;
        println!(
            "Stores over HTTP: {} sessions created then verified at random, {} connections, \
             {:.1} s of verify load per store after {:.1} s warm-up",
            s.sessions,
            s.connections,
            s.duration.as_secs_f64(),
            s.warmup.as_secs_f64(),
        );
        println!("  bare axum hello (POST /): {}", self.hello.line());
        for r in &self.stores {
            println!("  {} create: {}", r.store.name(), r.create.line());
            println!("  {} verify: {}", r.store.name(), r.verify.line());
        }
        println!();
        print!("{}", self.table());
    }

    /// The stores side by side: create and verify throughput, verify latency, and verify
    /// throughput over the embedded store's and over the hello ceiling's.
    pub fn table(&self) -> String {
        let embedded_verify = self.stores.first().map_or(0.0, |r| r.verify.throughput());
        let ratio = |x: f64, of: f64| {
            if of > 0.0 {
                format!("{:.2}", x / of)
            } else {
                "—".to_owned()
            }
        };
        let mut out = String::from(
            "| store | create | create p99 | verify | verify p50 | verify p99 | verify p99.9 \
             | verify / embedded | verify / hello |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for r in &self.stores {
            let c = Latencies::of(&r.create.histogram);
            let v = Latencies::of(&r.verify.histogram);
            out.push_str(&format!(
                "| {} | {} req/s | {} | {} req/s | {} | {} | {} | {} | {} |\n",
                r.store.name(),
                stats::fmt_rate(r.create.throughput()),
                stats::fmt_duration(c.p99),
                stats::fmt_rate(r.verify.throughput()),
                stats::fmt_duration(v.p50),
                stats::fmt_duration(v.p99),
                stats::fmt_duration(v.p999),
                ratio(r.verify.throughput(), embedded_verify),
                ratio(r.verify.throughput(), self.hello.throughput()),
            ));
        }
        out
    }

    /// The row of the hello ceiling.
    pub fn hello_row(&self) -> Row {
        Row {
            scenario: format!(
                "HTTP bare axum `POST /` hello (ceiling), {} conns",
                self.settings.connections
            ),
            throughput: self.hello.throughput(),
            unit: "req/s",
            latencies: Latencies::of(&self.hello.histogram),
            ratio: Some(1.0),
        }
    }

    /// Summary rows for the combined table of `all`.
    pub fn rows(&self) -> Vec<Row> {
        let c = self.settings.connections;
        let hello = self.hello.throughput();
        let mut rows = Vec::new();
        for r in &self.stores {
            rows.push(Row {
                scenario: format!("HTTP verify on {}, {c} conns", r.store.name()),
                throughput: r.verify.throughput(),
                unit: "req/s",
                latencies: Latencies::of(&r.verify.histogram),
                ratio: (hello > 0.0).then(|| r.verify.throughput() / hello),
            });
            rows.push(Row {
                scenario: format!("HTTP durable create on {}", r.store.name()),
                throughput: r.create.throughput(),
                unit: "req/s",
                latencies: Latencies::of(&r.create.histogram),
                ratio: None,
            });
        }
        rows
    }
}

/// Runs the scenario: the embedded store (with the hello ceiling), then each of `stores`.
pub fn run(settings: &http::Settings, stores: &[Store]) -> anyhow::Result<Report> {
    let (create, hello, verify) = http::run_on(settings, &Store::Embedded, true)?;
    let hello = hello.ok_or_else(|| anyhow::anyhow!("the hello server was not measured"))?;
    let mut results = vec![StoreResult {
        store: Store::Embedded,
        create,
        verify,
    }];
    for store in stores {
        let (create, _, verify) = http::run_on(settings, store, false)?;
        results.push(StoreResult {
            store: store.clone(),
            create,
            verify,
        });
    }
    Ok(Report {
        settings: settings.clone(),
        hello,
        stores: results,
    })
}
