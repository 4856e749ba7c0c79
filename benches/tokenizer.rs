//! Criterion benches of the core: pre-tokenization, training, encoding and shard packing throughput.
//!
//! The corpus is `SMALLM_BENCH_CORPUS` (a file or a directory of `.txt`/`.py`/`.md` files) or, by
//! default, the Python standard library sources of `python3` (present on any machine with Python),
//! falling back to this crate's own sources. `SMALLM_BENCH_BYTES` caps how much is read (default
//! 8 MB) so a run stays in the minutes. `cargo bench` prints the throughput in bytes per second.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use smallm::pack::{PackOptions, Packer, BOS};
use smallm::pretokenize::{PreTokenizer, GPT2_PATTERN, GPT4_PATTERN};
use smallm::train::{TrainOptions, WordCounts};

const DEFAULT_LIMIT: usize = 8 << 20;

/// Files under `root` with a text extension, outside test folders, in a stable order.
fn text_files(root: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    let mut entries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for path in entries {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if path.is_dir() {
            if !matches!(
                name,
                "test" | "tests" | "idle_test" | "site-packages" | "dist-packages" | "target"
            ) && !name.starts_with('.')
            {
                text_files(&path, out);
            }
        } else if [".py", ".txt", ".md", ".rs"]
            .iter()
            .any(|e| name.ends_with(e))
        {
            out.push(path);
        }
    }
}

fn python_stdlib() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['stdlib'])",
        ])
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    path.is_dir().then_some(path)
}

/// The benchmark corpus as documents (one per file), at most `limit` bytes in all.
fn corpus() -> (String, Vec<String>) {
    let limit = std::env::var("SMALLM_BENCH_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_LIMIT);
    let (name, root) = match std::env::var_os("SMALLM_BENCH_CORPUS") {
        Some(p) => ("SMALLM_BENCH_CORPUS".to_string(), PathBuf::from(p)),
        None => match python_stdlib() {
            Some(p) => ("python stdlib".to_string(), p),
            None => (
                "crate sources".to_string(),
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("rust"),
            ),
        },
    };
    let mut files = Vec::new();
    if root.is_file() {
        files.push(root.clone());
    } else {
        text_files(&root, &mut files);
    }
    let mut docs = Vec::new();
    let mut total = 0;
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        if total >= limit {
            break;
        }
        let mut take = (limit - total).min(text.len());
        while !text.is_char_boundary(take) {
            take -= 1;
        }
        total += take;
        docs.push(text[..take].to_string());
    }
    assert!(total > 0, "no text found under {}", root.display());
    eprintln!(
        "bench corpus: {name} ({}), {} documents, {:.1} MB",
        root.display(),
        docs.len(),
        total as f64 / 1e6
    );
    (name, docs)
}

fn benches(c: &mut Criterion) {
    let (_, docs) = corpus();
    let bytes: usize = docs.iter().map(String::len).sum();
    let joined = docs.concat();
    let lines: Vec<&str> = joined.lines().filter(|l| !l.is_empty()).collect();

    let mut group = c.benchmark_group("pretokenize");
    group.throughput(Throughput::Bytes(bytes as u64));
    for (name, pattern) in [("gpt4", GPT4_PATTERN), ("gpt2", GPT2_PATTERN)] {
        let pre = PreTokenizer::new(pattern).unwrap();
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut n = 0usize;
                pre.split(&joined, |_| n += 1).unwrap();
                n
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("train");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .throughput(Throughput::Bytes(bytes as u64));
    let train = |vocab_size| {
        let mut counts = WordCounts::new(GPT4_PATTERN).unwrap();
        counts.add_documents(&docs).unwrap();
        let options = TrainOptions {
            vocab_size,
            special_tokens: vec!["<|endoftext|>".into()],
            min_frequency: 2,
        };
        counts.train(&options, &mut |_| true).unwrap().0
    };
    group.bench_function("count_pieces", |b| {
        b.iter(|| {
            let mut counts = WordCounts::new(GPT4_PATTERN).unwrap();
            counts.add_documents(&docs).unwrap();
            counts.unique_pieces()
        })
    });
    group.bench_function("vocab_8192", |b| b.iter(|| train(8192)));
    group.finish();

    let tokenizer = train(8192);
    let mut group = c.benchmark_group("encode");
    group
        .throughput(Throughput::Bytes(bytes as u64))
        .sample_size(10);
    group.bench_function("one_string_single_thread", |b| {
        b.iter(|| tokenizer.encode_ordinary(&joined).unwrap())
    });
    group.bench_function("batch_of_lines", |b| {
        b.iter(|| tokenizer.encode_batch(&lines, None).unwrap())
    });
    group.finish();

    // Packing = batch encoding + splitting + writing shards; compare with encode/batch_of_documents.
    let mut group = c.benchmark_group("pack");
    group
        .throughput(Throughput::Bytes(bytes as u64))
        .sample_size(10);
    group.bench_function("batch_of_documents", |b| {
        b.iter(|| tokenizer.encode_batch(&docs, None).unwrap())
    });
    let dir = std::env::temp_dir().join(format!("smallm-bench-pack-{}", std::process::id()));
    group.bench_function("shards", |b| {
        b.iter(|| {
            let _ = std::fs::remove_dir_all(&dir);
            let options = PackOptions {
                dir: dir.clone(),
                shard_tokens: 1 << 24,
                val_fraction: 0.005,
                fingerprint: "bench".into(),
                bos: BOS.into(),
                clean: Default::default(),
                dedup_against: Vec::new(),
                dry_run: None,
            };
            let mut packer = Packer::new(tokenizer.clone(), options).unwrap();
            packer.add_documents(&docs, 0, 0).unwrap();
            packer.finish().unwrap()
        })
    });
    let _ = std::fs::remove_dir_all(&dir);
    group.finish();

    // A single piece with no split point must cost linear time, not quadratic.
    let mut group = c.benchmark_group("encode_single_piece");
    group.sample_size(10);
    for mb in [1usize, 4] {
        let text = "a".repeat(mb << 20);
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_function(format!("{mb}MB"), |b| {
            b.iter_batched(
                || (),
                |()| tokenizer.encode_ordinary(&text).unwrap(),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(tokenizer, benches);
criterion_main!(tokenizer);
