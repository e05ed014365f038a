//! Wilcoxon rank-sum marker statistics, identical to scanpy's
//! `rank_genes_groups(method = "wilcoxon")` (spec §2) or to presto's `wilcoxauc` (spec §3),
//! from one sweep over the non-zeros of every gene.
//!
//! # Algorithm
//!
//! The input is genes x cells (R's layout): a dgCMatrix ([`CscView`]) or a dense
//! column-major matrix ([`DenseView`]). One counting pass over the row indices gives the
//! stored values per gene (and checks that row indices are sorted within columns). Genes
//! are then cut into *parts* of about equal stored values, a few per thread, which run in
//! parallel (rayon); a part is cut again into *chunks* that one thread runs in order:
//!
//! 1. **Gene-major copy of the chunk.** One scatter pass over the cells, each read from a
//!    per-cell cursor that walks down its sorted row indices (no search, sequential reads,
//!    software prefetch a few cells ahead). Each non-zero keeps only its value (`f64`, so
//!    ties stay exact) and the *slot* (`u16`) of its cell, never the cell index: 10 bytes a
//!    value. A chunk holds max(2^21, 32 x cells) stored values (20 MB at 29k cells, 320 MB
//!    at 1M cells) and only one chunk per thread exists at a time, so the extra memory is
//!    a small fraction of the input.
//!    For the scanpy flavour the copy is *packed* instead whenever the keys fit (see
//!    `extract_csc_packed`): one `u64` a value, `(key - C) << slot_bits | slot`, with
//!    one offset `C` for the whole matrix placed from a sample of the values (log1p data:
//!    always); the value comes back from it exactly, and less the gene's smallest key it
//!    is already the sorted entry of step 2's slot layout (8 bytes a value, one write
//!    stream a gene, no conversion pass). A chunk holding a key outside the window (or a
//!    NaN) is copied the general way. A packed chunk holds max(2^22, 32 x cells) values
//!    (32 MB at 29k cells, 256 MB at 1M cells).
//! 2. **Per gene:** one pass sums values and counts non-zeros per slot and maps each value
//!    to an order-preserving integer key; an LSD radix sort (two passes of digits sized to
//!    the gene, three for genes over 65,536 values) orders a window of the leading varying
//!    key bits, and the rare runs that share a window are put in exact order on the fly.
//!    When the gene's key range leaves room (values of one sign over a few binary orders
//!    of magnitude, e.g. any log1p data; presto's f32 keys always), each sorted entry holds
//!    the whole key above the value's slot, so the walk below reads slots and finds tie
//!    blocks without going back to the values (log1p data: ~60 % of values are tied);
//!    otherwise the entry holds the value's index.
//!    All zeros (implicit, explicit, or dense) form a single tie block whose mid-rank is
//!    computed in closed form, below the positives and above the negatives. One walk over
//!    the sorted tie blocks adds each value's mid-rank to the rank sum of its slot, for all
//!    groups at once (scanpy: doubled ranks in integers, so rank sums are exact), and
//!    accumulates the tie term `sum(t^3 - t)` exactly (u128).
//! 3. **Per group** (in parallel): z, p, BH, fold changes, fractions, AUC.
//!
//! The cost is linear in the non-zeros (plus the cells once per chunk), with no
//! densification; NaN is detected through the per-slot sums, so hot loops carry no check.
//!
//! # Semantics
//!
//! | | [`Flavor::Scanpy`] | [`Flavor::Presto`] |
//! |---|---|---|
//! | cells compared | rest: *all* other cells, including cells of untested groups and cells whose group is NA (negative code); reference: the reference group's cells | all other cells of the tested groups; NA cells and untested groups are dropped |
//! | value comparison | exact `f64` | values cast to `f32` first (presto's `pair<float, size_t>`) |
//! | `score` | z, no continuity correction, tie correction only with `tie_correct` (then over the compared cells); NaN (0/0) becomes 0 | z with continuity correction 0.5 and presto's tie list (every tie block *except the largest value's*), always on |
//! | `logfc` | `log2((expm1(mean_in) + 1e-9) / (expm1(mean_out) + 1e-9))` (means of the input values; `expm1(x ln b)` with `log_base`) | `mean_in - mean_out` |
//! | `pts`, `pts_rest` | fractions 0..1 of cells with `x != 0` | percentages 0..100 (`pct_in`, `pct_out`) |
//! | `padj` | Benjamini–Hochberg over all genes of the group (statsmodels arithmetic) | same (R `p.adjust` arithmetic) |
//! | smallest group | 2 cells for every tested group and the reference, else [`ScError::Groups`] | 1 cell; empty groups are skipped (presto drops unused levels); at least 2 non-empty groups |
//! | reference group | supported | not supported (presto has none): [`ScError::Input`] |
//!
//! Precision notes:
//! * scanpy computes z in float64 and *stores* it as float32 (`scores`, `logfoldchanges`);
//!   p-values come from the float64 z. This module returns the float64 values; round to
//!   float32 on the R side only if bit-identical `scores` are wanted.
//! * presto computes tie-block mean ranks in float32 (`rank_sum / n + 1`), which is inexact
//!   once the sum of a block's positions passes 2^24. This is emulated exactly: for a
//!   [`ExprMatrix::Csc`] input as presto's sparse path (stored values ranked among
//!   themselves, then shifted by the zero count, the zero block's rank in double), for an
//!   [`ExprMatrix::Dense`] input as presto's dense path (all values ranked, zero block too).
//! * presto's sparse path ranks stored negative values *above* the zeros and counts stored
//!   explicit zeros as non-zero (spec §8 trap 4). This module ranks them correctly
//!   (negatives below zeros, explicit zeros are zeros) and counts `x != 0` in `pct`, i.e.
//!   it gives presto's dense-path answer; for a dgCMatrix without negatives or explicit
//!   zeros (any `log1p` data after `drop0`) the answer is presto's.
//!
//! Run inside [`crate::threads::with_threads`] to choose the number of threads.

use crate::error::{ScError, ScResult};
use crate::matrix::{CscView, DenseView, ExprMatrix};
use rayon::prelude::*;
use std::sync::Mutex;

/// Which tool's statistics to reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// scanpy `rank_genes_groups(method = "wilcoxon")`, 1.5 – 1.12 and HEAD's V1 preset.
    Scanpy,
    /// presto 1.0.0 `wilcoxauc`.
    Presto,
}

impl std::str::FromStr for Flavor {
    type Err = ScError;
    fn from_str(s: &str) -> ScResult<Self> {
        match s {
            "scanpy" => Ok(Self::Scanpy),
            "presto" => Ok(Self::Presto),
            _ => Err(ScError::Input(format!(
                "flavor must be \"scanpy\" or \"presto\", not \"{s}\""
            ))),
        }
    }
}

/// What each tested group is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reference {
    /// One versus the rest (see the table in the module docs for what "rest" holds).
    Rest,
    /// One versus this group (0-based code). The reference gets no output rows.
    Group(usize),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WilcoxonOptions {
    pub flavor: Flavor,
    pub reference: Reference,
    /// scanpy's `tie_correct` (default false). Ignored by presto, which always corrects
    /// (its own way).
    pub tie_correct: bool,
    /// scanpy's `adata.uns["log1p"]["base"]`: `None` means natural log, so the fold change
    /// uses `expm1(mean)`; `Some(b)` uses `expm1(mean * ln b)`. Ignored by presto.
    pub log_base: Option<f64>,
}

impl Default for WilcoxonOptions {
    fn default() -> Self {
        Self {
            flavor: Flavor::Scanpy,
            reference: Reference::Rest,
            tie_correct: false,
            log_base: None,
        }
    }
}

/// Tidy result: one row per (tested group, gene), **group-major and unsorted**: row
/// `k * n_genes + gene` is gene `gene` (0-based matrix row) of `tested[k]`. Sort per group
/// by `score` on the R side (scanpy: descending; its order of tied scores is arbitrary).
#[derive(Debug, Clone, PartialEq)]
pub struct WilcoxonResult {
    pub n_genes: usize,
    /// group codes that got rows, in output order (the reference is never among them;
    /// presto skips empty groups)
    pub tested: Vec<u32>,
    /// per tested group: cells in the group and in its comparison set (rest or reference)
    pub n_in: Vec<u64>,
    pub n_out: Vec<u64>,
    /// per row: group code (0-based)
    pub group: Vec<u32>,
    /// per row: gene = matrix row (0-based)
    pub gene: Vec<u32>,
    /// z score (scanpy: plain; presto: continuity-corrected), float64
    pub score: Vec<f64>,
    /// scanpy: log2 fold change of expm1(mean log values); presto: mean_in - mean_out
    pub logfc: Vec<f64>,
    /// two-sided normal p-value, `2 * pnorm(-|z|)`
    pub pval: Vec<f64>,
    /// Benjamini–Hochberg over the genes of the group
    pub padj: Vec<f64>,
    /// scanpy: fraction 0..1 with `x != 0` in the group; presto: percent 0..100 (`pct_in`)
    pub pts: Vec<f64>,
    /// the same over the comparison set (rest or reference); presto: `pct_out`
    pub pts_rest: Vec<f64>,
    /// `u / (n_in * n_out)`
    pub auc: Vec<f64>,
    /// Mann–Whitney U of the group: rank sum minus `n_in (n_in + 1) / 2`
    pub u: Vec<f64>,
    /// mean of the input values in the group (presto `avgExpr`)
    pub mean_in: Vec<f64>,
    /// mean over the comparison set
    pub mean_out: Vec<f64>,
}

impl WilcoxonResult {
    /// The per-row statistics columns, in declaration order (score .. mean_out).
    pub fn stat_columns(&self) -> [&[f64]; 10] {
        [
            &self.score,
            &self.logfc,
            &self.pval,
            &self.padj,
            &self.pts,
            &self.pts_rest,
            &self.auc,
            &self.u,
            &self.mean_in,
            &self.mean_out,
        ]
    }
}

/// Cells per group code (`groups[j] < 0` = NA, not counted). Lets the caller check group
/// sizes against its own labels before calling [`wilcoxon`].
pub fn group_sizes(groups: &[i32], n_groups: usize) -> ScResult<Vec<u64>> {
    let mut n = vec![0u64; n_groups];
    for &g in groups {
        if g >= 0 {
            let g = g as usize;
            if g >= n_groups {
                return Err(ScError::Groups(format!(
                    "group code {g} is outside 0..{n_groups}"
                )));
            }
            n[g] += 1;
        }
    }
    Ok(n)
}

const EXCLUDED: u16 = u16::MAX;
const SIGN64: u64 = 1 << 63;
const SIGN32: u32 = 1 << 31;

/// Everything the per-gene kernel needs, decided once.
struct Setup {
    /// slot of each cell: 0..k = tested groups, k = "other" (scanpy rest: untested + NA
    /// cells) or the reference (reference mode); EXCLUDED = not compared at all
    slot_of_cell: Vec<u16>,
    /// cells per slot (len k + 1)
    n_slot: Vec<u64>,
    /// number of tested groups
    k: usize,
    /// group code of each tested slot
    tested: Vec<u32>,
    flavor: Flavor,
    ref_mode: bool,
    sparse: bool,
    /// cells compared in rest mode (all slots)
    n_universe: u64,
    /// bits that hold a slot (0..=k) in a sorted entry of the slot layout (see
    /// [`sort_gene`])
    slot_bits: u32,
    /// the *packed copy* (scanpy, CSC; see [`extract_csc_packed`]): the key offset `C`
    /// such that, as far as a sample of the values tells, every value's key lies in
    /// `C..C + 2^(64 - slot_bits)`; `None` = the copy of values and slots
    key_base: Option<u64>,
}

impl Setup {
    fn n_slots(&self) -> usize {
        self.k + 1
    }
}

fn build_setup(
    m: &ExprMatrix,
    groups: &[i32],
    n_groups: usize,
    tested: Option<&[usize]>,
    opt: &WilcoxonOptions,
) -> ScResult<Setup> {
    let ncol = m.ncol();
    if ncol as u64 > IDX_MASK {
        return Err(ScError::Dims(format!(
            "{ncol} cells is too many; at most {IDX_MASK} are supported"
        )));
    }
    if groups.len() != ncol {
        return Err(ScError::Dims(format!(
            "{} group labels for {} cells; give one label per cell (column)",
            groups.len(),
            ncol
        )));
    }
    if n_groups >= EXCLUDED as usize {
        return Err(ScError::Input(format!(
            "{n_groups} groups is too many; at most {} are supported",
            EXCLUDED as usize - 1
        )));
    }
    let sizes = group_sizes(groups, n_groups)?;
    if let Some(b) = opt.log_base {
        if !(b > 0.0 && b.is_finite() && b != 1.0) {
            return Err(ScError::Input(format!(
                "log_base must be a positive finite number other than 1, not {b}"
            )));
        }
    }
    let reference = match opt.reference {
        Reference::Rest => None,
        Reference::Group(r) => {
            if opt.flavor == Flavor::Presto {
                return Err(ScError::Input(
                    "flavor \"presto\" compares each group with the rest only (presto has no \
                     reference group); use flavor \"scanpy\" for a reference group"
                        .into(),
                ));
            }
            if r >= n_groups {
                return Err(ScError::Groups(format!(
                    "reference group code {r} is outside 0..{n_groups}"
                )));
            }
            Some(r)
        }
    };
    let mut list: Vec<usize> = match tested {
        None => (0..n_groups).collect(),
        Some(t) => {
            let mut seen = vec![false; n_groups];
            for &g in t {
                if g >= n_groups {
                    return Err(ScError::Groups(format!(
                        "tested group code {g} is outside 0..{n_groups}"
                    )));
                }
                if seen[g] {
                    return Err(ScError::Input(format!(
                        "group code {g} is listed twice in the groups to test"
                    )));
                }
                seen[g] = true;
            }
            t.to_vec()
        }
    };
    match opt.flavor {
        Flavor::Scanpy => {
            // scanpy checks every selected group and the reference (value_counts < 2),
            // unused categories included
            let mut check = list.clone();
            if let Some(r) = reference {
                check.push(r);
            }
            for &g in &check {
                if sizes[g] < 2 {
                    return Err(ScError::Groups(format!(
                        "group code {g} has {} cell(s); the Wilcoxon test needs at least 2 \
                         cells in every tested group{}; drop or merge it, or leave it out \
                         of the groups to test",
                        sizes[g],
                        if reference.is_some() {
                            " and in the reference"
                        } else {
                            ""
                        }
                    )));
                }
            }
            if let Some(r) = reference {
                list.retain(|&g| g != r);
            }
        }
        Flavor::Presto => {
            // presto subsets cells to groups_use, then drops unused levels
            list.retain(|&g| sizes[g] > 0);
            if list.len() < 2 {
                return Err(ScError::Groups(format!(
                    "presto needs at least 2 non-empty groups among the tested ones, found {}",
                    list.len()
                )));
            }
        }
    }
    if list.is_empty() {
        return Err(ScError::Input(
            "there is no group to test (the only selected group is the reference)".into(),
        ));
    }
    let k = list.len();
    let mut slot_of_group = vec![EXCLUDED; n_groups];
    for (s, &g) in list.iter().enumerate() {
        slot_of_group[g] = s as u16;
    }
    let other = k as u16;
    if let Some(r) = reference {
        slot_of_group[r] = other;
    }
    let keep_others = opt.flavor == Flavor::Scanpy && reference.is_none();
    let slot_of_cell: Vec<u16> = groups
        .iter()
        .map(|&g| {
            let s = if g >= 0 {
                slot_of_group[g as usize]
            } else {
                EXCLUDED
            };
            if s == EXCLUDED && keep_others {
                other
            } else {
                s
            }
        })
        .collect();
    let mut n_slot = vec![0u64; k + 1];
    for &s in &slot_of_cell {
        if s != EXCLUDED {
            n_slot[s as usize] += 1;
        }
    }
    let n_universe = n_slot.iter().sum();
    Ok(Setup {
        slot_of_cell,
        n_slot,
        k,
        tested: list.iter().map(|&g| g as u32).collect(),
        flavor: opt.flavor,
        ref_mode: reference.is_some(),
        sparse: matches!(m, ExprMatrix::Csc(_)),
        n_universe,
        slot_bits: (u64::BITS - (k as u64).leading_zeros()).max(1),
        key_base: None,
    })
}

/// The key offset of the packed copy ([`Setup::key_base`]) from a sample of the stored
/// values (scanpy flavour, CSC input), or `None` when the sample's keys already span too
/// wide a range. The sample only places the window: each chunk checks every key, and a
/// chunk holding a key outside the window is copied the general way (values and slots).
fn choose_key_base(m: &ExprMatrix, st: &Setup) -> Option<u64> {
    let ExprMatrix::Csc(c) = m else {
        return None;
    };
    if st.flavor != Flavor::Scanpy {
        return None;
    }
    let x = c.x();
    let room = 1u64 << (64 - st.slot_bits);
    let step = (x.len() / 4096).max(1);
    let (mut lo, mut hi) = (u64::MAX, 0u64);
    for &v in x.iter().step_by(step) {
        if v != 0.0 && !v.is_nan() {
            let k = key64(v);
            lo = lo.min(k);
            hi = hi.max(k);
        }
    }
    if lo > hi {
        // no sampled non-zero: centre the window on zero
        return Some(SIGN64 - room / 2);
    }
    let span = hi - lo;
    if span >= room {
        return None;
    }
    // the sample's range in the middle of the window, which must end by 2^64 (so that a
    // key below the window wraps to an offset of at least `room`)
    Some(
        lo.saturating_sub((room - 1 - span) / 2)
            .min(u64::MAX - room + 1),
    )
}

/// Per (gene, slot) accumulators of the sweep.
#[derive(Debug, Clone, Copy, Default)]
struct SlotStat {
    /// rest mode: rank sum W; reference mode: U against the reference
    rank: f64,
    /// sum of the values
    sum: f64,
    /// values != 0
    nnz: u64,
    /// rest mode: tie term of the gene (same in every slot); reference mode: tie term of
    /// the pooled group + reference (presto: without the largest block)
    tie: f64,
}

/// Reusable per-thread buffers.
#[derive(Default)]
struct Scratch {
    // gene-major copy of a chunk
    counts: Vec<usize>,
    /// next free position of each gene of the chunk (u32: a chunk holds < 2^32 values)
    fill: Vec<u32>,
    cursor: Vec<u32>,
    vals: Vec<f64>,
    codes: Vec<u16>,
    /// the packed copy ([`extract_csc_packed`]), and the cursors before it
    ent: Vec<u64>,
    cursor_saved: Vec<u32>,
    // per gene
    packed: Vec<u64>,
    tmp: Vec<u64>,
    hist: Vec<u32>,
    rnnz: Vec<u64>,
    nnz: Vec<u64>,
    sum: Vec<f64>,
    /// scanpy: twice the rank sums (or U), exact integers
    acc2: Vec<u64>,
    /// presto: rank sums
    accf: Vec<f64>,
    // reference mode
    bcnt: Vec<u64>,
    touched: Vec<u16>,
    corr: Vec<u128>,
}

/// Compute the Wilcoxon rank-sum statistics of every gene for each tested group.
///
/// * `m`: genes x cells. CSC row indices must be sorted and unique within each column (any
///   valid dgCMatrix), else [`ScError::Dims`].
/// * `groups`: 0-based group code of every cell; negative = NA.
/// * `n_groups`: number of group codes (levels, used or not).
/// * `tested`: the groups to test, in output order (`None` = all `0..n_groups`).
///
/// Errors: [`ScError::Dims`] (label count, CSC layout), [`ScError::Groups`] (codes out of
/// range; scanpy: a tested group or the reference with < 2 cells, naming its code;
/// presto: fewer than 2 non-empty groups), [`ScError::Input`] (bad options, duplicated
/// tested groups, presto with a reference), [`ScError::Value`] (NaN among the compared
/// cells). Never panics on user input.
pub fn wilcoxon(
    m: &ExprMatrix,
    groups: &[i32],
    n_groups: usize,
    tested: Option<&[usize]>,
    opt: &WilcoxonOptions,
) -> ScResult<WilcoxonResult> {
    wilcoxon_chunked(m, groups, n_groups, tested, opt, None)
}

/// [`wilcoxon`] with a chosen chunk size (stored values per chunk), for tests.
fn wilcoxon_chunked(
    m: &ExprMatrix,
    groups: &[i32],
    n_groups: usize,
    tested: Option<&[usize]>,
    opt: &WilcoxonOptions,
    chunk: Option<u64>,
) -> ScResult<WilcoxonResult> {
    wilcoxon_impl(m, groups, n_groups, tested, opt, chunk, KeyBase::Sampled)
}

/// How [`Setup::key_base`] is chosen.
#[derive(Debug, Clone, Copy)]
enum KeyBase {
    /// [`choose_key_base`]
    Sampled,
    /// this offset (tests: a window that misses some values forces the fallback)
    #[cfg_attr(not(test), allow(dead_code))]
    Fixed(u64),
    /// no packed copy
    #[cfg_attr(not(test), allow(dead_code))]
    General,
}

fn wilcoxon_impl(
    m: &ExprMatrix,
    groups: &[i32],
    n_groups: usize,
    tested: Option<&[usize]>,
    opt: &WilcoxonOptions,
    chunk: Option<u64>,
    key_base: KeyBase,
) -> ScResult<WilcoxonResult> {
    let mut setup = build_setup(m, groups, n_groups, tested, opt)?;
    setup.key_base = match key_base {
        KeyBase::Sampled => choose_key_base(m, &setup),
        KeyBase::Fixed(c) => {
            (matches!(m, ExprMatrix::Csc(_)) && setup.flavor == Flavor::Scanpy).then_some(c)
        }
        KeyBase::General => None,
    };
    let n_genes = m.nrow();
    let ns = setup.n_slots();
    let mut stats = vec![SlotStat::default(); n_genes * ns];

    let plan = plan_work(m, chunk, setup.key_base.is_some())?;
    // split the output into the parts' disjoint slices
    let mut parts: Vec<(&[usize], &mut [SlotStat])> = Vec::with_capacity(plan.parts.len());
    let mut rest: &mut [SlotStat] = &mut stats;
    for b in &plan.parts {
        let (g0, g1) = (b[0], b[b.len() - 1]);
        let (a, r) = rest.split_at_mut((g1 - g0) * ns);
        parts.push((b.as_slice(), a));
        rest = r;
    }
    // one set of buffers per worker thread, reused by every part it runs: rayon's
    // map_init makes a new one for each split another thread steals, whose tens of MB
    // of fresh memory the kernel faults in again (0.50 -> 0.45 s on 2 threads at seed
    // scale); a busy set (not expected: run_part starts no parallel work) is replaced by
    // a fresh one
    let pool: Vec<Mutex<Scratch>> = (0..rayon::current_num_threads().max(1))
        .map(|_| Mutex::new(Scratch::default()))
        .collect();
    let saw_nan = parts
        .into_par_iter()
        .map(|(bounds, out)| {
            let k = rayon::current_thread_index().unwrap_or(0) % pool.len();
            match pool[k].try_lock() {
                Ok(mut sc) => run_part(m, bounds, &plan.row_nnz, &setup, &mut sc, out),
                Err(_) => run_part(
                    m,
                    bounds,
                    &plan.row_nnz,
                    &setup,
                    &mut Scratch::default(),
                    out,
                ),
            }
        })
        .reduce(|| false, |a, b| a || b);
    if saw_nan {
        return Err(ScError::Value(
            "the expression matrix holds NaN for a compared cell; remove or impute \
             missing values first"
                .into(),
        ));
    }
    Ok(finish(&setup, &stats, n_genes, opt))
}

/// How the genes are cut: `parts` run in parallel; each part is a list of chunk
/// boundaries `[g0, g1, ..., gk]` whose chunks one thread runs in order, so a cursor per
/// cell walks down the sorted row indices of a CSC matrix without searching.
struct Plan {
    parts: Vec<Vec<usize>>,
    /// stored values per gene (CSC only; an upper bound of the gene's compared non-zeros)
    row_nnz: Vec<u64>,
}

/// `packed`: the chunks will be packed copies (8 bytes a value, not 10), whose best size
/// on the seed-scale benchmark is twice the general copy's (fewer passes over the cells).
fn plan_work(m: &ExprMatrix, chunk: Option<u64>, packed: bool) -> ScResult<Plan> {
    let n_genes = m.nrow();
    let threads = rayon::current_num_threads().max(1);
    let ncol = m.ncol().max(1) as u64;
    // per-gene cost (stored values or cells) decides the cut
    let (row_nnz, cost): (Vec<u64>, Vec<u64>) = match m {
        ExprMatrix::Csc(c) => {
            let r = row_counts(c)?;
            let cost = r.clone();
            (r, cost)
        }
        ExprMatrix::Dense(_) => (Vec::new(), vec![ncol; n_genes]),
    };
    let total: u64 = cost.iter().sum();
    // parts: a few per thread, for balance; chunks: big enough that the per-chunk pass over
    // all cells is cheap, small enough that the gene-major copy stays in cache
    let n_parts = (threads * 4) as u64;
    let part_target = (total / n_parts).max(1);
    // (at most 2^30, so that a chunk, which may pass the target by one gene of < 2^31
    // values, holds fewer than 2^32 values: `Scratch::fill` is u32)
    let chunk_target = chunk
        .unwrap_or_else(|| {
            (1u64 << if packed { 22 } else { 21 })
                .max(32 * ncol)
                .min(part_target.max(1 << 16))
        })
        .min(1 << 30);
    let mut parts = Vec::new();
    let mut bounds = vec![0usize];
    let (mut in_part, mut in_chunk) = (0u64, 0u64);
    for (r, &c) in cost.iter().enumerate() {
        in_part += c;
        in_chunk += c;
        if r + 1 == n_genes {
            break;
        }
        if in_part >= part_target {
            bounds.push(r + 1);
            parts.push(std::mem::replace(&mut bounds, vec![r + 1]));
            in_part = 0;
            in_chunk = 0;
        } else if in_chunk >= chunk_target {
            bounds.push(r + 1);
            in_chunk = 0;
        }
    }
    if n_genes > 0 {
        bounds.push(n_genes);
        parts.push(bounds);
    }
    Ok(Plan { parts, row_nnz })
}

/// Stored values per row, checking that row indices increase strictly within columns.
fn row_counts(c: &CscView) -> ScResult<Vec<u64>> {
    let ncol = c.ncol();
    let nrow = c.nrow();
    let threads = rayon::current_num_threads().max(1);
    let n_blocks = (threads * 2).min(ncol.max(1));
    let step = ncol.div_ceil(n_blocks).max(1);
    let res: Vec<Option<Vec<u32>>> = (0..n_blocks)
        .into_par_iter()
        .map(|b| {
            // u32: a row has fewer stored values than there are cells (< 2^31)
            let mut cnt = vec![0u32; nrow];
            let mut unsorted = false;
            for j in (b * step)..((b + 1) * step).min(ncol) {
                let (is, _) = c.col(j);
                let mut prev = -1i32;
                for &r in is {
                    unsorted |= r <= prev;
                    prev = r;
                    cnt[r as usize] += 1;
                }
            }
            (!unsorted).then_some(cnt)
        })
        .collect();
    let mut total = vec![0u64; nrow];
    for r in res {
        let r = r.ok_or_else(|| {
            ScError::Dims(
                "sparse matrix row indices must be sorted and unique within each column \
                 (a valid dgCMatrix); repair it with methods::validObject() / \
                 Matrix::sparseMatrix()"
                    .into(),
            )
        })?;
        for (t, v) in total.iter_mut().zip(r) {
            *t += v as u64;
        }
    }
    Ok(total)
}

/// Run the chunks of one part in order. Returns whether a NaN was seen.
fn run_part(
    m: &ExprMatrix,
    bounds: &[usize],
    row_nnz: &[u64],
    st: &Setup,
    sc: &mut Scratch,
    out: &mut [SlotStat],
) -> bool {
    let ns = st.n_slots();
    let base = bounds[0];
    if let ExprMatrix::Csc(c) = m {
        // cursor of every compared cell: its first stored row >= the part's first gene
        let (p, ii) = (c.p(), c.i());
        let (g0, nrow) = (base as i32, c.nrow().max(1));
        sc.cursor.clear();
        sc.cursor.extend((0..c.ncol()).map(|j| {
            let (a, b) = (p[j] as usize, p[j + 1] as usize);
            if st.slot_of_cell[j] == EXCLUDED || a == b || base == 0 {
                a as u32
            } else {
                let guess = ((b - a) as u64 * base as u64 / nrow as u64) as usize;
                (a + lower_bound_near(&ii[a..b], g0, guess)) as u32
            }
        }));
    }
    let mut nan = false;
    // the packed copy until a chunk holds a key outside its window (then the general copy
    // for the rest of the part)
    let mut packed = st.key_base.is_some();
    for w in bounds.windows(2) {
        let (g0, g1) = (w[0], w[1]);
        if let (ExprMatrix::Csc(c), Some(cb), true) = (m, st.key_base, packed) {
            sc.cursor_saved.clone_from(&sc.cursor);
            if extract_csc_packed(c, g0, g1, row_nnz, st, cb, sc) {
                let ent = std::mem::take(&mut sc.ent);
                for r in 0..(g1 - g0) {
                    let (a, b) = (sc.counts[r], sc.fill[r] as usize);
                    let o = (g0 - base + r) * ns;
                    nan |= gene_kernel_packed(&ent[a..b], st, cb, sc, &mut out[o..o + ns]);
                }
                sc.ent = ent;
                continue;
            }
            std::mem::swap(&mut sc.cursor, &mut sc.cursor_saved);
            packed = false;
        }
        match m {
            ExprMatrix::Csc(c) => extract_csc(c, g0, g1, row_nnz, st, sc),
            ExprMatrix::Dense(d) => extract_dense(d, g0, g1, st, sc),
        }

        let mut vals = std::mem::take(&mut sc.vals);
        let mut codes = std::mem::take(&mut sc.codes);
        for r in 0..(g1 - g0) {
            let (a, b) = (sc.counts[r], sc.fill[r] as usize);
            let o = (g0 - base + r) * ns;
            nan |= gene_kernel(&vals[a..b], &codes[a..b], st, sc, &mut out[o..o + ns]);
        }
        std::mem::swap(&mut sc.vals, &mut vals);
        std::mem::swap(&mut sc.codes, &mut codes);
    }
    nan
}

/// First position in the sorted `v` holding a value >= `x`, searched outward from
/// `guess` (galloping, then binary search): a few probes, mostly in one cache line, when
/// the guess is close, as it is for row indices spread over the genes.
fn lower_bound_near(v: &[i32], x: i32, guess: usize) -> usize {
    let n = v.len();
    let g = guess.min(n);
    let (lo, hi) = if g < n && v[g] < x {
        // answer is after g
        let mut step = 1;
        let mut lo = g + 1;
        loop {
            let probe = g + step;
            if probe >= n {
                break (lo, n);
            }
            if v[probe] >= x {
                break (lo, probe);
            }
            lo = probe + 1;
            step *= 2;
        }
    } else {
        // answer is at or before g
        let mut step = 1;
        let mut hi = g;
        loop {
            if step > g {
                break (0, hi);
            }
            let probe = g - step;
            if v[probe] < x {
                break (probe + 1, hi);
            }
            hi = probe;
            step *= 2;
        }
    };
    lo + v[lo..hi].partition_point(|&r| r < x)
}

/// Space per gene of the chunk `g0..g1` from the stored-value counts: `sc.counts` gets
/// the start of each gene's span (and the total last), `sc.fill` each gene's write
/// position (its start). Returns the total.
fn gene_spans(row_nnz: &[u64], g0: usize, g1: usize, sc: &mut Scratch) -> usize {
    sc.counts.clear();
    sc.counts.push(0);
    let mut acc = 0usize;
    for &n in &row_nnz[g0..g1] {
        acc += n as usize;
        sc.counts.push(acc);
    }
    sc.fill.clear();
    sc.fill
        .extend(sc.counts[..g1 - g0].iter().map(|&c| c as u32));
    acc
}

/// One scatter pass over the cells, each from its cursor: afterwards gene `r` (relative
/// to g0) holds `vals[counts[r]..fill[r]]` / `codes[...]`, its non-zero values in
/// compared cells. Space per gene comes from the stored-value counts.
#[inline(never)]
fn extract_csc(c: &CscView, g0: usize, g1: usize, row_nnz: &[u64], st: &Setup, sc: &mut Scratch) {
    let (p, ii, x) = (c.p(), c.i(), c.x());
    let acc = gene_spans(row_nnz, g0, g1, sc);
    // grow only: slots past a gene's fill are never read, so stale values may stay
    if sc.vals.len() < acc {
        sc.vals.resize(acc, 0.0);
        sc.codes.resize(acc, 0);
    }
    let g1i = g1 as i32;
    let g0i = g0 as i32;
    let (vals, codes, fill) = (&mut sc.vals[..], &mut sc.codes[..], &mut sc.fill[..]);
    let cursor = &mut sc.cursor[..];
    let slot_of_cell = &st.slot_of_cell[..];
    let ncol = cursor.len();
    for j in 0..ncol {
        // the cells' segments are short and scattered: fetch a few cells ahead
        if j + PREFETCH < ncol {
            let q = cursor[j + PREFETCH] as usize;
            prefetch(ii.as_ptr().wrapping_add(q) as *const u8);
            prefetch(x.as_ptr().wrapping_add(q) as *const u8);
        }
        let cur = &mut cursor[j];
        let s = slot_of_cell[j];
        if s == EXCLUDED {
            continue;
        }
        let b = p[j + 1] as usize;
        let mut k = *cur as usize;
        while k < b {
            let r = ii[k];
            if r >= g1i {
                break;
            }
            let v = x[k];
            if v != 0.0 {
                let r = (r - g0i) as usize;
                let pos = fill[r];
                vals[pos as usize] = v;
                codes[pos as usize] = s;
                fill[r] = pos + 1;
            }
            k += 1;
        }
        *cur = k as u32;
    }
}

/// [`extract_csc`] into the *packed copy* (scanpy flavour): one `u64` a non-zero,
/// `(key64(v) - cb) << slot_bits | slot` in `sc.ent` (one write stream a gene instead of
/// two, 8 bytes a value instead of 10), which is, less the gene's smallest key, the
/// sorted entry of the slot layout ([`sort_gene`]), and from which the value comes back
/// exactly. Returns false, leaving the cursors moved, when a key falls outside
/// `cb..cb + 2^(64 - slot_bits)` (NaN, or a value far from the sampled ones): the caller
/// then copies the chunk the general way.
#[inline(never)]
fn extract_csc_packed(
    c: &CscView,
    g0: usize,
    g1: usize,
    row_nnz: &[u64],
    st: &Setup,
    cb: u64,
    sc: &mut Scratch,
) -> bool {
    let (p, ii, x) = (c.p(), c.i(), c.x());
    let acc = gene_spans(row_nnz, g0, g1, sc);
    // grow only: slots past a gene's fill are never read, so stale values may stay
    if sc.ent.len() < acc {
        sc.ent.resize(acc, 0);
    }
    let (g0i, g1i) = (g0 as i32, g1 as i32);
    let sb = st.slot_bits;
    let (ent, fill) = (&mut sc.ent[..], &mut sc.fill[..]);
    let cursor = &mut sc.cursor[..];
    let slot_of_cell = &st.slot_of_cell[..];
    let ncol = cursor.len();
    // OR of every key offset: a bit at or above 64 - sb means a key outside the window
    let mut seen = 0u64;
    for j in 0..ncol {
        if j + PREFETCH < ncol {
            let q = cursor[j + PREFETCH] as usize;
            prefetch(ii.as_ptr().wrapping_add(q) as *const u8);
            prefetch(x.as_ptr().wrapping_add(q) as *const u8);
        }
        let cur = &mut cursor[j];
        let s = slot_of_cell[j];
        if s == EXCLUDED {
            continue;
        }
        let s = s as u64;
        let b = p[j + 1] as usize;
        let mut k = *cur as usize;
        while k < b {
            let r = ii[k];
            if r >= g1i {
                break;
            }
            let v = x[k];
            if v != 0.0 {
                let r = (r - g0i) as usize;
                let off = key64(v).wrapping_sub(cb);
                seen |= off;
                let pos = fill[r];
                ent[pos as usize] = (off << sb) | s;
                fill[r] = pos + 1;
            }
            k += 1;
        }
        *cur = k as u32;
    }
    seen >> (64 - sb) == 0
}

/// How many cells ahead [`extract_csc`] prefetches.
const PREFETCH: usize = 12;

/// A hint to load the cache line at `p` (no effect off x86_64). Never dereferences.
#[inline(always)]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch is a hint that never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

fn extract_dense(d: &DenseView, g0: usize, g1: usize, st: &Setup, sc: &mut Scratch) {
    let nr = g1 - g0;
    sc.counts.clear();
    sc.counts.resize(nr + 1, 0);
    for j in 0..d.ncol() {
        if st.slot_of_cell[j] == EXCLUDED {
            continue;
        }
        for (r, &v) in d.col(j)[g0..g1].iter().enumerate() {
            if v != 0.0 {
                sc.counts[r + 1] += 1;
            }
        }
    }
    for r in 0..nr {
        sc.counts[r + 1] += sc.counts[r];
    }
    let total = sc.counts[nr];
    // grow only: slots past a gene's fill are never read, so stale values may stay
    if sc.vals.len() < total {
        sc.vals.resize(total, 0.0);
        sc.codes.resize(total, 0);
    }
    sc.fill.clear();
    sc.fill.extend(sc.counts[..nr].iter().map(|&c| c as u32));
    for j in 0..d.ncol() {
        let s = st.slot_of_cell[j];
        if s == EXCLUDED {
            continue;
        }
        for (r, &v) in d.col(j)[g0..g1].iter().enumerate() {
            if v != 0.0 {
                let pos = sc.fill[r];
                sc.vals[pos as usize] = v;
                sc.codes[pos as usize] = s;
                sc.fill[r] = pos + 1;
            }
        }
    }
}

/// Order-preserving map of a non-zero, non-NaN f64 to u64 (negatives: all bits flipped;
/// positives: sign bit set).
#[inline(always)]
fn key64(v: f64) -> u64 {
    let b = v.to_bits();
    b ^ ((((b as i64) >> 63) as u64) | SIGN64)
}

/// Order-preserving map of a non-zero, non-NaN f32 to u32.
#[inline(always)]
fn key32(v: f32) -> u32 {
    let b = v.to_bits();
    b ^ ((((b as i32) >> 31) as u32) | SIGN32)
}

/// presto's mid-rank of a tie block occupying 0-based sorted positions `a..a+t`:
/// `rank_sum / n + 1` in float32, where `rank_sum` accumulates the positions one by one
/// in float32 (`rank_sum = a; rank_sum += a+1; ...`). Exact (and fast) while the sum is
/// small; otherwise the float32 accumulation is replayed.
#[inline]
fn presto_mid_rank(a: usize, t: usize) -> f64 {
    const LIM: u128 = 1 << 23;
    let (a128, t128) = (a as u128, t as u128);
    let sum = a128 * t128 + t128 * (t128.saturating_sub(1)) / 2;
    if sum < LIM && a128 + t128 < LIM {
        return a as f64 + (t as f64 + 1.0) * 0.5;
    }
    let mut rank_sum = a as f32;
    let mut n = 1.0f32;
    for q in (a + 1)..(a + t) {
        rank_sum += q as f32;
        n += 1.0;
    }
    ((rank_sum / n) + 1.0f32) as f64
}

#[inline]
fn tie_term(t: u64) -> u128 {
    let t = t as u128;
    t * t * t - t
}

/// The sort key of a non-zero, non-NaN value: order-preserving, and equal exactly when the
/// values compare equal (scanpy: as f64; presto: cast to f32).
#[inline(always)]
fn full_key<const PRESTO: bool>(v: f64) -> u64 {
    if PRESTO {
        key32(v as f32) as u64
    } else {
        key64(v)
    }
}

/// Keys below this are negative values.
#[inline(always)]
fn neg_limit<const PRESTO: bool>() -> u64 {
    if PRESTO {
        SIGN32 as u64
    } else {
        SIGN64
    }
}

/// Whether a non-zero f64 takes part in the ranking (presto: not if it is 0 as f32).
#[inline(always)]
fn ranked<const PRESTO: bool>(v: f64) -> bool {
    !PRESTO || (v as f32) != 0.0
}

/// Statistics of one gene: `vals`/`codes` are its non-zero values in compared cells.
/// Returns whether the gene holds a NaN (found through the sums, so the hot loops carry
/// no check).
fn gene_kernel(
    vals: &[f64],
    codes: &[u16],
    st: &Setup,
    sc: &mut Scratch,
    out: &mut [SlotStat],
) -> bool {
    match st.flavor {
        Flavor::Scanpy => gene_kernel_t::<false>(vals, codes, st, sc, out),
        Flavor::Presto => gene_kernel_t::<true>(vals, codes, st, sc, out),
    }
    sc.sum.iter().any(|s| s.is_nan()) && vals.iter().any(|v| v.is_nan())
}

#[inline(never)]
fn gene_kernel_t<const PRESTO: bool>(
    vals: &[f64],
    codes: &[u16],
    st: &Setup,
    sc: &mut Scratch,
    out: &mut [SlotStat],
) {
    let ns = st.n_slots();
    sc.nnz.clear();
    sc.nnz.resize(ns, 0);
    sc.sum.clear();
    sc.sum.resize(ns, 0.0);
    sc.rnnz.clear();
    sc.rnnz.resize(ns, 0);
    let (mut lo, mut hi) = (u64::MAX, 0u64);
    let (mut n_r, mut n_neg) = (0usize, 0usize);
    let neg = neg_limit::<PRESTO>();
    {
        let (nnz, sum, rnnz) = (&mut sc.nnz[..], &mut sc.sum[..], &mut sc.rnnz[..]);
        let packed = &mut sc.packed;
        packed.clear();
        for (i, (&v, &c)) in vals.iter().zip(codes).enumerate() {
            let c = c as usize;
            nnz[c] += 1;
            sum[c] += v;
            if ranked::<PRESTO>(v) {
                let k = full_key::<PRESTO>(v);
                lo = lo.min(k);
                hi = hi.max(k);
                if PRESTO {
                    rnnz[c] += 1;
                }
                packed.push(raw_entry::<PRESTO>(k, i));
                n_r += 1;
                n_neg += (k < neg) as usize;
            }
        }
    }
    if !PRESTO {
        // every non-zero is ranked
        sc.rnnz.copy_from_slice(&sc.nnz);
    }
    // the slot layout (key and slot in the entry) whenever the key range leaves room
    let sb = st.slot_bits;
    let slot_layout = n_r > 0 && (64 - (hi - lo).leading_zeros()) + sb <= 64;
    let tie = if slot_layout {
        let shift = sort_gene::<PRESTO, true>(n_r, lo, hi, codes, sb, sc);
        if st.ref_mode {
            walk_reference::<PRESTO, true>(vals, codes, shift, sb, st, sc, n_neg)
        } else {
            walk_rest::<PRESTO, true>(vals, codes, shift, sb, st, sc, n_neg)
        }
    } else {
        let shift = sort_gene::<PRESTO, false>(n_r, lo, hi, codes, sb, sc);
        if st.ref_mode {
            walk_reference::<PRESTO, false>(vals, codes, shift, sb, st, sc, n_neg)
        } else {
            walk_rest::<PRESTO, false>(vals, codes, shift, sb, st, sc, n_neg)
        }
    };
    write_out::<PRESTO>(sc, &tie, out);
}

/// Inverse of [`key64`].
#[inline(always)]
fn unkey64(k: u64) -> f64 {
    f64::from_bits(if k & SIGN64 != 0 { k ^ SIGN64 } else { !k })
}

/// [`gene_kernel`] (scanpy) on the gene's slice of the packed copy
/// ([`extract_csc_packed`]): the same sums (values decoded exactly, added in the same
/// cell order), the same sorted entries (the packed entries less the gene's smallest
/// key, see [`sort_packed`]) and the same walks, so the same bits out.
#[inline(never)]
fn gene_kernel_packed(
    ent: &[u64],
    st: &Setup,
    cb: u64,
    sc: &mut Scratch,
    out: &mut [SlotStat],
) -> bool {
    let ns = st.n_slots();
    let sb = st.slot_bits;
    let smask = (1u64 << sb) - 1;
    sc.nnz.clear();
    sc.nnz.resize(ns, 0);
    sc.sum.clear();
    sc.sum.resize(ns, 0.0);
    let (mut lo, mut hi) = (u64::MAX, 0u64);
    // offsets below this are keys of negative values
    let neg = SIGN64.saturating_sub(cb);
    let mut n_neg = 0usize;
    {
        let (nnz, sum) = (&mut sc.nnz[..], &mut sc.sum[..]);
        for &e in ent {
            let c = (e & smask) as usize;
            let k = e >> sb;
            nnz[c] += 1;
            sum[c] += unkey64(k + cb);
            lo = lo.min(k);
            hi = hi.max(k);
            n_neg += (k < neg) as usize;
        }
    }
    sc.rnnz.clone_from(&sc.nnz);
    let tie = if ent.is_empty() {
        sc.packed.clear();
        walk_any::<false, true>(0, sb, st, sc, n_neg)
    } else {
        let shift = sort_packed(ent, lo, hi, sb, sc);
        walk_any::<false, true>(shift, sb, st, sc, n_neg)
    };
    write_out::<false>(sc, &tie, out);
    sc.sum.iter().any(|s| s.is_nan()) && ent.iter().any(|&e| unkey64((e >> sb) + cb).is_nan())
}

/// The walk of the mode (rest or reference) on sorted entries in `sc.packed`.
fn walk_any<const PRESTO: bool, const SLOT: bool>(
    shift: u32,
    sb: u32,
    st: &Setup,
    sc: &mut Scratch,
    n_neg: usize,
) -> Tie {
    if st.ref_mode {
        walk_reference::<PRESTO, SLOT>(&[], &[], shift, sb, st, sc, n_neg)
    } else {
        walk_rest::<PRESTO, SLOT>(&[], &[], shift, sb, st, sc, n_neg)
    }
}

/// The kernel's results into the gene's output row.
fn write_out<const PRESTO: bool>(sc: &Scratch, tie: &Tie, out: &mut [SlotStat]) {
    for (s, o) in out.iter_mut().enumerate() {
        *o = SlotStat {
            rank: if PRESTO {
                sc.accf[s]
            } else {
                sc.acc2[s] as f64 * 0.5
            },
            sum: sc.sum[s],
            nnz: sc.nnz[s],
            tie: match tie {
                Tie::Gene(t) => *t,
                Tie::PerSlot => sc.corr.get(s).map_or(0.0, |&c| c as f64),
            },
        };
    }
}

/// [`sort_gene`] in the slot layout for packed entries (`ent`: `k << sb | slot`, key
/// offsets `k` in `lo..=hi`): leaves in `sc.packed` exactly what [`sort_gene`] leaves for
/// the same values (entries `(k - lo) << sb | slot`; the same window `shift`), without
/// a conversion pass: the radix passes subtract `lo << sb` on the fly.
#[inline(never)]
fn sort_packed(ent: &[u64], lo: u64, hi: u64, sb: u32, sc: &mut Scratch) -> u32 {
    let n = ent.len();
    let off = lo << sb;
    let bits = 64 - (hi - lo).leading_zeros();
    if n <= 64 {
        sc.packed.clear();
        sc.packed.extend(ent.iter().map(|&e| e - off));
        insertion_sort(&mut sc.packed);
        return 0;
    }
    let w = (usize::BITS - n.leading_zeros())
        .saturating_sub(2)
        .clamp(6, 10);
    if n < 65536 {
        radix_packed::<2>(ent, off, bits, w, sb, sc)
    } else {
        radix_packed::<3>(ent, off, bits, 11, sb, sc)
    }
}

/// [`radix`] on packed entries (see [`sort_packed`]).
fn radix_packed<const P: usize>(
    ent: &[u64],
    off: u64,
    bits: u32,
    w: u32,
    sb: u32,
    sc: &mut Scratch,
) -> u32 {
    let n = ent.len();
    let shift = bits.saturating_sub(w * P as u32);
    let nb = 1usize << w;
    let mask = (nb - 1) as u64;
    sc.hist.clear();
    sc.hist.resize(P * nb, 0);
    if sc.tmp.len() < n {
        sc.tmp.resize(n, 0);
    }
    if sc.packed.len() < n {
        sc.packed.resize(n, 0);
    }
    let sh0 = sb + shift;
    {
        let hist = &mut sc.hist[..];
        for &e in ent {
            let win = (e - off) >> sh0;
            hist[(win & mask) as usize] += 1;
            hist[nb + ((win >> w) & mask) as usize] += 1;
            if P == 3 {
                hist[2 * nb + ((win >> (2 * w)) & mask) as usize] += 1;
            }
        }
    }
    // the first pass that moves anything reads `ent` (subtracting `off`), later ones
    // `sc.packed`
    let mut moved = false;
    for d in 0..P {
        let sh = sh0 + d as u32 * w;
        let hist = &mut sc.hist[d * nb..(d + 1) * nb];
        // a digit that is the same everywhere needs no pass
        if hist[(((ent[0] - off) >> sh) & mask) as usize] as usize == n {
            continue;
        }
        let mut acc = 0u32;
        for c in hist.iter_mut() {
            let t = *c;
            *c = acc;
            acc += t;
        }
        let dst = &mut sc.tmp[..n];
        let sub = if moved { 0 } else { off };
        let src = if moved { &sc.packed[..n] } else { ent };
        for &e in src {
            let x = e - sub;
            let b = ((x >> sh) & mask) as usize;
            // SAFETY: as in [`radix`]: b <= mask < nb = hist.len(), and hist[b] stays
            // below n = dst.len().
            unsafe {
                let h = hist.get_unchecked_mut(b);
                *dst.get_unchecked_mut(*h as usize) = x;
                *h += 1;
            }
        }
        std::mem::swap(&mut sc.packed, &mut sc.tmp);
        moved = true;
    }
    if !moved {
        sc.packed.clear();
        sc.packed.extend(ent.iter().map(|&e| e - off));
    }
    sc.packed.truncate(n);
    shift
}

/// The tie term of a gene: one for all slots (rest), or per slot in `Scratch::corr`
/// (reference mode).
enum Tie {
    Gene(f64),
    PerSlot,
}

/// Bits of a sorted entry's payload: the value's index in the gene's slice.
const IDX_BITS: u32 = 31;
const IDX_MASK: u64 = (1 << IDX_BITS) - 1;
/// Bits of the sort window above the payload.
const WIN_BITS: u32 = 64 - IDX_BITS;

/// What the kernel pass leaves in `Scratch::packed` for value `i` with key `k`: scanpy
/// the key itself (the index is the position: every value is ranked), presto the 32-bit
/// key above the index.
#[inline(always)]
fn raw_entry<const PRESTO: bool>(k: u64, i: usize) -> u64 {
    if PRESTO {
        (k << IDX_BITS) | i as u64
    } else {
        k
    }
}

/// Key and value index of a raw entry at position `q`.
#[inline(always)]
fn raw_parts<const PRESTO: bool>(p: u64, q: usize) -> (u64, u64) {
    if PRESTO {
        (p >> IDX_BITS, p & IDX_MASK)
    } else {
        (p, q as u64)
    }
}

/// Sort the gene's ranked values by a window of their keys: `sc.packed` comes with the
/// kernel pass's raw entries and leaves holding, ascending,
/// `window << IDX_BITS | index`, with `window = (key - lo) >> shift` the leading varying
/// bits of the key (12 to 22, or 33 for huge genes; the returned `shift` is 0 when the
/// window is the whole key). Entries whose windows are equal are in index order, not
/// necessarily in value order: the walks put such runs in order with [`fix_run`]
/// (windows equal by chance are rare; equal values need nothing).
///
/// LSD radix sort, two (three for huge genes) passes of digits sized to the gene, with no
/// data-dependent branches; tiny genes use insertion sort.
///
/// The *slot layout* (`SLOT`, when the key range fits in `64 - sb` bits, as it does for
/// any data of one sign and a few binary orders of magnitude) keeps the whole key with
/// the value's slot instead: entries are `(key - lo) << sb | slot`, sorted by their
/// window `entry >> (sb + shift)`. Then the walks read slots and compare keys without
/// going back to `vals`/`codes`, and a run of equal windows is put in order by sorting
/// the entries themselves.
#[inline(never)]
fn sort_gene<const PRESTO: bool, const SLOT: bool>(
    n: usize,
    lo: u64,
    hi: u64,
    codes: &[u16],
    sb: u32,
    sc: &mut Scratch,
) -> u32 {
    debug_assert_eq!(sc.packed.len(), n);
    if n == 0 {
        return 0;
    }
    let bits = 64 - (hi - lo).leading_zeros();
    if n <= 64 {
        if SLOT {
            for (q, p) in sc.packed.iter_mut().enumerate() {
                let (k, i) = raw_parts::<PRESTO>(*p, q);
                *p = ((k - lo) << sb) | codes[i as usize] as u64;
            }
            insertion_sort(&mut sc.packed);
            // the entries are in exact key order: the window is the whole key
            return 0;
        }
        let shift = bits.saturating_sub(WIN_BITS);
        for (q, p) in sc.packed.iter_mut().enumerate() {
            let (k, i) = raw_parts::<PRESTO>(*p, q);
            *p = (((k - lo) >> shift) << IDX_BITS) | i;
        }
        insertion_sort(&mut sc.packed);
        return shift;
    }
    // digits of about log2(n) - 2 bits keep the histograms small next to the gene (their
    // clearing and prefix sums cost as much as a pass over a quarter of the values); the
    // window (2 or 3 digits) is wide enough that chance collisions stay rare, and the
    // runs they leave are short and put in order by the walks
    let w = (usize::BITS - n.leading_zeros())
        .saturating_sub(2)
        .clamp(6, 10);
    if n < 65536 {
        radix::<PRESTO, SLOT, 2>(n, lo, bits, w, codes, sb, sc)
    } else {
        radix::<PRESTO, SLOT, 3>(n, lo, bits, 11, codes, sb, sc)
    }
}

/// [`sort_gene`]'s radix sort: `P` passes of `w`-bit digits.
#[allow(clippy::too_many_arguments)]
fn radix<const PRESTO: bool, const SLOT: bool, const P: usize>(
    n: usize,
    lo: u64,
    bits: u32,
    w: u32,
    codes: &[u16],
    sb: u32,
    sc: &mut Scratch,
) -> u32 {
    let shift = bits.saturating_sub(w * P as u32);
    let nb = 1usize << w;
    let mask = (nb - 1) as u64;
    sc.hist.clear();
    sc.hist.resize(P * nb, 0);
    if sc.tmp.len() < n {
        sc.tmp.resize(n, 0);
    }
    {
        let hist = &mut sc.hist[..];
        for (q, p) in sc.packed.iter_mut().enumerate() {
            let (k, i) = raw_parts::<PRESTO>(*p, q);
            let win = (k - lo) >> shift;
            hist[(win & mask) as usize] += 1;
            hist[nb + ((win >> w) & mask) as usize] += 1;
            if P == 3 {
                hist[2 * nb + ((win >> (2 * w)) & mask) as usize] += 1;
            }
            *p = if SLOT {
                ((k - lo) << sb) | codes[i as usize] as u64
            } else {
                (win << IDX_BITS) | i
            };
        }
    }
    for d in 0..P {
        let (hist, src, dst) = (
            &mut sc.hist[d * nb..(d + 1) * nb],
            &sc.packed[..n],
            &mut sc.tmp[..n],
        );
        let sh = if SLOT { sb + shift } else { IDX_BITS } + d as u32 * w;
        // a digit that is the same everywhere needs no pass
        if hist[((src[0] >> sh) & mask) as usize] as usize == n {
            continue;
        }
        let mut acc = 0u32;
        for c in hist.iter_mut() {
            let t = *c;
            *c = acc;
            acc += t;
        }
        for &x in src {
            let b = ((x >> sh) & mask) as usize;
            // SAFETY: b <= mask < nb = hist.len(); hist[b] starts at the number of
            // entries with a smaller digit and is bumped once per entry with digit b, so
            // it stays below n = dst.len().
            unsafe {
                let h = hist.get_unchecked_mut(b);
                *dst.get_unchecked_mut(*h as usize) = x;
                *h += 1;
            }
        }
        std::mem::swap(&mut sc.packed, &mut sc.tmp);
    }
    sc.packed.truncate(n);
    shift
}

/// Put a run of entries with equal windows in value order (ties by index).
fn fix_run<const PRESTO: bool>(vals: &[f64], run: &mut [u64]) {
    let key = |p: u64| full_key::<PRESTO>(vals[(p & IDX_MASK) as usize]);
    if !run.is_sorted_by_key(|&p| key(p)) {
        run.sort_unstable_by_key(|&p| (key(p), p));
    }
}

/// Find the tie block starting at `a` (fixing the window run there first if needed):
/// returns its end. `fixed` is the end of the last run already put in order.
#[inline(always)]
fn block_end<const PRESTO: bool, const SLOT: bool>(
    vals: &[f64],
    packed: &mut [u64],
    shift: u32,
    sb: u32,
    a: usize,
    fixed: &mut usize,
) -> usize {
    if SLOT {
        return block_end_slot(packed, shift, sb, a, fixed);
    }
    let n = packed.len();
    let w0 = packed[a] >> IDX_BITS;
    let mut b = a + 1;
    if b == n || packed[b] >> IDX_BITS != w0 {
        return b;
    }
    while b < n && packed[b] >> IDX_BITS == w0 {
        b += 1;
    }
    if shift == 0 {
        return b;
    }
    if *fixed <= a {
        fix_run::<PRESTO>(vals, &mut packed[a..b]);
        *fixed = b;
    }
    let k0 = full_key::<PRESTO>(vals[(packed[a] & IDX_MASK) as usize]);
    let mut e = a + 1;
    while e < b && full_key::<PRESTO>(vals[(packed[e] & IDX_MASK) as usize]) == k0 {
        e += 1;
    }
    e
}

/// [`block_end`] in the slot layout: the entries carry their keys. A run of equal
/// windows is nearly always one tie block (same key, slots in any order), found in one
/// scan; only a run holding several keys is sorted (by key) first.
#[inline(always)]
fn block_end_slot(packed: &mut [u64], shift: u32, sb: u32, a: usize, fixed: &mut usize) -> usize {
    let n = packed.len();
    let k0 = packed[a] >> sb;
    let mut e = a + 1;
    while e < n && packed[e] >> sb == k0 {
        e += 1;
    }
    let wsh = sb + shift;
    if shift == 0 || *fixed > a || e == n || packed[e] >> wsh != k0 >> shift {
        // exact windows, an already ordered run, or the window run is this tie block
        return e;
    }
    let mut b = e + 1;
    while b < n && packed[b] >> wsh == k0 >> shift {
        b += 1;
    }
    let run = &mut packed[a..b];
    if !run.is_sorted_by_key(|&p| p >> sb) {
        if run.len() <= 16 {
            insertion_sort(run);
        } else {
            run.sort_unstable();
        }
    }
    *fixed = b;
    let k0 = packed[a] >> sb;
    let mut e = a + 1;
    while e < b && packed[e] >> sb == k0 {
        e += 1;
    }
    e
}

/// The slot of a sorted entry.
#[inline(always)]
fn entry_slot<const SLOT: bool>(p: u64, codes: &[u16], smask: u64) -> usize {
    if SLOT {
        (p & smask) as usize
    } else {
        codes[(p & IDX_MASK) as usize] as usize
    }
}

fn insertion_sort(v: &mut [u64]) {
    for i in 1..v.len() {
        let x = v[i];
        let mut j = i;
        while j > 0 && v[j - 1] > x {
            v[j] = v[j - 1];
            j -= 1;
        }
        v[j] = x;
    }
}

/// One-vs-rest walk: every compared cell is in some slot; mid-ranks over all of them
/// accumulate per slot (scanpy: doubled, in `acc2`; presto: in `accf`). Returns the tie
/// term `sum(t^3 - t)` (presto: without the largest value's block).
#[inline(never)]
fn walk_rest<const PRESTO: bool, const SLOT: bool>(
    vals: &[f64],
    codes: &[u16],
    shift: u32,
    sb: u32,
    st: &Setup,
    sc: &mut Scratch,
    n_neg: usize,
) -> Tie {
    let wsh = if SLOT { sb + shift } else { IDX_BITS };
    let smask = (1u64 << sb) - 1;
    let ns = st.n_slots();
    let mut packed = std::mem::take(&mut sc.packed);
    let (acc2, accf) = (&mut sc.acc2, &mut sc.accf);
    acc2.clear();
    acc2.resize(ns, 0);
    accf.clear();
    accf.resize(ns, 0.0);
    let n_r = packed.len();
    let n_zero = st.n_universe as usize - n_r;
    let mut tie: u128 = 0;
    let mut last_term: u128 = 0;
    let mut fixed = 0;
    // scanpy in the slot layout: the branch-free walk, unless a window run needs fixing
    let done = SLOT && !PRESTO;
    if done {
        // room for any slot bit pattern (the passes index without bounds checks)
        acc2.resize(ns.max(1 << sb), 0);
        tie = walk_rest_slot_scanpy(&mut packed, shift, sb, n_neg, n_zero, acc2);
    }
    // negatives sit below the zeros, positives above them
    for (start, end, off) in [(0, n_neg, 0), (n_neg, n_r, n_zero)] {
        if done {
            break;
        }
        let mut a = start;
        while a < end {
            let p = packed[a];
            if a + 1 == n_r || (packed[a + 1] ^ p) >> wsh != 0 {
                // a value of its own (the common case)
                let c = entry_slot::<SLOT>(p, codes, smask);
                if PRESTO {
                    accf[c] += presto_rank(st.sparse, a, 1, n_neg, n_zero);
                } else {
                    acc2[c] += 2 * (a + off) as u64 + 2;
                }
                last_term = 0;
                a += 1;
                continue;
            }
            let b = block_end::<PRESTO, SLOT>(vals, &mut packed, shift, sb, a, &mut fixed);
            let t = b - a;
            if PRESTO {
                let rank = presto_rank(st.sparse, a, t, n_neg, n_zero);
                for &p in &packed[a..b] {
                    accf[entry_slot::<SLOT>(p, codes, smask)] += rank;
                }
            } else {
                let rank2 = 2 * (a + off) as u64 + t as u64 + 1;
                for &p in &packed[a..b] {
                    acc2[entry_slot::<SLOT>(p, codes, smask)] += rank2;
                }
            }
            last_term = tie_term(t as u64);
            tie += last_term;
            a = b;
        }
    }
    if n_zero > 0 {
        for s in 0..ns {
            let z = st.n_slot[s] - sc.rnnz[s];
            if z == 0 {
                continue;
            }
            if PRESTO {
                let zrank = if st.sparse {
                    n_neg as f64 + (n_zero as f64 + 1.0) * 0.5
                } else {
                    presto_mid_rank(n_neg, n_zero)
                };
                accf[s] += z as f64 * zrank;
            } else {
                acc2[s] += z * (2 * n_neg + n_zero + 1) as u64;
            }
        }
    }
    let zero_term = tie_term(n_zero as u64);
    tie += zero_term;
    if PRESTO {
        // presto never records the block of the largest value
        let top = if n_r > n_neg || n_zero == 0 {
            last_term
        } else {
            zero_term
        };
        tie -= top;
    }
    sc.packed = packed;
    Tie::Gene(tie as f64)
}

/// [`walk_rest`] for scanpy in the slot layout, without a branch per value: the runs of
/// equal windows that hold several keys are put in key order first ([`fix_windows`]),
/// then a forward pass adds each value's block start `a` (plus `1 + 2 * offset`) to its
/// slot, a backward pass its block end `b`, so a slot gets `a + b + 1 + 2 * offset` per
/// value, twice the value's mid-rank `(a + 1 + b) / 2 + offset`; the tie term grows by
/// `3 j (j + 1)` at the `j`-th (0-based) value of a block, `t^3 - t` over the block.
/// Adds the doubled rank sums of the non-zeros to `acc2` (zeroed, at least `2^sb` long)
/// and returns the tie term of their blocks.
#[inline(never)]
fn walk_rest_slot_scanpy(
    packed: &mut [u64],
    shift: u32,
    sb: u32,
    n_neg: usize,
    n_zero: usize,
    acc2: &mut [u64],
) -> u128 {
    if shift > 0 {
        fix_windows(packed, sb, sb + shift);
    }
    let smask = (1u64 << sb) - 1;
    // (a slot is at most smask: no bounds checks below)
    let acc2 = &mut acc2[..=smask as usize];
    let mut t: u128 = 0;
    for (r0, r1, off) in [(0, n_neg, 0), (n_neg, packed.len(), n_zero)] {
        if r0 >= r1 {
            continue;
        }
        let run = &packed[r0..r1];
        let base = (r0 + 1 + 2 * off) as u64;
        // forward: block starts (relative to r0)
        let mut start = 0usize;
        let mut prev = run[0];
        for (i, &p) in run.iter().enumerate() {
            start = if (p ^ prev) >> sb == 0 { start } else { i };
            prev = p;
            // j < 2^31, so 3 j (j + 1) < 2^64
            let j = (i - start) as u64;
            acc2[(p & smask) as usize] += start as u64 + base;
            t += (3 * j * (j + 1)) as u128;
        }
        // backward: block ends (relative to r0)
        let mut end = run.len();
        let mut next = run[run.len() - 1];
        for (i, &p) in run.iter().enumerate().rev() {
            end = if (p ^ next) >> sb == 0 { end } else { i + 1 };
            next = p;
            acc2[(p & smask) as usize] += (r0 + end) as u64;
        }
    }
    t
}

/// Sort (by key, i.e. by entry) every run of equal windows `entry >> wsh` that holds
/// more than one key `entry >> sb` (`wsh > sb`), so the entries end in key order.
#[inline(never)]
fn fix_windows(packed: &mut [u64], sb: u32, wsh: u32) {
    let n = packed.len();
    // neighbours differ in the key but not in the window iff their xor d is in
    // [2^sb, 2^wsh): one unsigned comparison, no branch on the (unpredictable) ties
    let (lo, span) = (1u64 << sb, (1u64 << wsh) - (1u64 << sb));
    let mut i = 1;
    while i < n {
        if (packed[i] ^ packed[i - 1]).wrapping_sub(lo) >= span {
            i += 1;
            continue;
        }
        let w = packed[i] >> wsh;
        let mut a = i - 1;
        while a > 0 && packed[a - 1] >> wsh == w {
            a -= 1;
        }
        let mut b = i + 1;
        while b < n && packed[b] >> wsh == w {
            b += 1;
        }
        let run = &mut packed[a..b];
        if run.len() <= 16 {
            insertion_sort(run);
        } else {
            run.sort_unstable();
        }
        i = b;
    }
}

/// presto's rank of the tie block at sorted non-zero positions `a..a+t` (see
/// [`presto_mid_rank`]): the sparse path ranks stored values among themselves and adds
/// the zero count; the dense path ranks every value.
#[inline(always)]
fn presto_rank(sparse: bool, a: usize, t: usize, n_neg: usize, n_zero: usize) -> f64 {
    if a < n_neg {
        presto_mid_rank(a, t)
    } else if sparse {
        presto_mid_rank(a - n_neg, t) + (n_neg + n_zero) as f64
    } else {
        presto_mid_rank(a + n_zero, t)
    }
}

/// Group-vs-reference walk (scanpy): twice the U of each tested slot against the
/// reference slot, `U = sum over group values of (#ref below + #ref tied / 2)`, into
/// `acc2`, and the tie term of each pooled (group + reference) sample into `corr`.
fn walk_reference<const PRESTO: bool, const SLOT: bool>(
    vals: &[f64],
    codes: &[u16],
    shift: u32,
    sb: u32,
    st: &Setup,
    sc: &mut Scratch,
    n_neg: usize,
) -> Tie {
    let wsh = if SLOT { sb + shift } else { IDX_BITS };
    let smask = (1u64 << sb) - 1;
    let k = st.k;
    let mut packed = std::mem::take(&mut sc.packed);
    let n_r = packed.len();
    let mut fixed = 0;
    sc.acc2.clear();
    sc.acc2.resize(k + 1, 0);
    sc.accf.clear();
    sc.accf.resize(k + 1, 0.0);
    sc.bcnt.clear();
    sc.bcnt.resize(k + 1, 0);
    sc.corr.clear();
    sc.corr.resize(k, 0);
    sc.touched.clear();
    let mut ref_below: u64 = 0;
    let mut ref_only: u128 = 0;
    let mut zero_done = false;
    let mut a = 0;
    loop {
        if !zero_done && a >= n_neg {
            zero_done = true;
            // the zero block: every compared cell without a non-zero value
            let r0 = st.n_slot[k] - sc.rnnz[k];
            let half2 = 2 * ref_below + r0;
            let r0_term = tie_term(r0);
            ref_only += r0_term;
            for s in 0..k {
                let z = st.n_slot[s] - sc.rnnz[s];
                if z > 0 {
                    sc.acc2[s] += z * half2;
                    sc.corr[s] += tie_term(z + r0) - r0_term;
                }
            }
            ref_below += r0;
        }
        if a >= n_r {
            break;
        }
        let p = packed[a];
        if a + 1 == n_r || (packed[a + 1] ^ p) >> wsh != 0 {
            // a value of its own (the common case)
            let s = entry_slot::<SLOT>(p, codes, smask);
            if s == k {
                ref_below += 1;
            } else {
                sc.acc2[s] += 2 * ref_below;
            }
            a += 1;
            continue;
        }
        let b = block_end::<PRESTO, SLOT>(vals, &mut packed, shift, sb, a, &mut fixed);
        // a block never straddles zero: negatives and positives have different keys
        if b - a == 1 {
            let s = entry_slot::<SLOT>(packed[a], codes, smask);
            if s == k {
                ref_below += 1;
            } else {
                sc.acc2[s] += 2 * ref_below;
            }
        } else {
            for &p in &packed[a..b] {
                let s = entry_slot::<SLOT>(p, codes, smask) as u16;
                if sc.bcnt[s as usize] == 0 {
                    sc.touched.push(s);
                }
                sc.bcnt[s as usize] += 1;
            }
            let r_b = sc.bcnt[k];
            let half2 = 2 * ref_below + r_b;
            let r_term = tie_term(r_b);
            ref_only += r_term;
            for &s in &sc.touched {
                let s = s as usize;
                let c = sc.bcnt[s];
                if s != k {
                    sc.acc2[s] += c * half2;
                    sc.corr[s] += tie_term(c + r_b) - r_term;
                }
                sc.bcnt[s] = 0;
            }
            sc.touched.clear();
            ref_below += r_b;
        }
        a = b;
    }
    for c in sc.corr.iter_mut() {
        *c += ref_only;
    }
    sc.packed = packed;
    Tie::PerSlot
}

/// Benjamini–Hochberg as statsmodels `fdr_bh` (`p_(i) / (i/n)`, scanpy) or R `p.adjust`
/// (`n/i * p_(i)`, presto): running minimum from the largest p down, clipped at 1.
fn bh(p: &[f64], r_style: bool) -> Vec<f64> {
    let n = p.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_unstable_by(|&a, &b| p[a].total_cmp(&p[b]));
    let mut out = vec![0.0; n];
    let mut run = f64::INFINITY;
    for (r, &i) in order.iter().enumerate().rev() {
        let rank = (r + 1) as f64;
        let q = if r_style {
            n as f64 / rank * p[i]
        } else {
            p[i] / (rank / n as f64)
        };
        run = run.min(q);
        out[i] = run.min(1.0);
    }
    out
}

/// Two-sided normal p-value `2 * P(Z > |z|) = erfc(|z| / sqrt 2)` (R `2 * pnorm(-|z|)`,
/// scipy `2 * norm.sf(|z|)`), relative error ~1e-15 down to the underflow at |z| ~ 39.6.
pub fn two_sided_p(z: f64) -> f64 {
    // low part of 1/sqrt(2) - FRAC_1_SQRT_2
    const C_LO: f64 = -4.833646656726457e-17;
    let z = z.abs();
    let x = z * std::f64::consts::FRAC_1_SQRT_2;
    // the rounding error of x, undone to first order: d/dx erfc = -2/sqrt(pi) exp(-x^2)
    let dx = z.mul_add(std::f64::consts::FRAC_1_SQRT_2, -x) + z * C_LO;
    let p = erfc(x);
    if p == 0.0 || x < 1.0 {
        return p;
    }
    p - dx * std::f64::consts::FRAC_2_SQRT_PI * (-x * x).exp()
}

/// Per-group statistics from the per-(gene, slot) sweep results.
fn finish(st: &Setup, stats: &[SlotStat], n_genes: usize, opt: &WilcoxonOptions) -> WilcoxonResult {
    let k = st.k;
    let ns = st.n_slots();
    let presto = st.flavor == Flavor::Presto;
    let ln_base = opt.log_base.map(f64::ln);
    let expm1 = |x: f64| match ln_base {
        Some(l) => (x * l).exp_m1(),
        None => x.exp_m1(),
    };
    type Cols = [Vec<f64>; 10];
    let per_group: Vec<Cols> = (0..k)
        .into_par_iter()
        .map(|s| {
            let n = st.n_slot[s] as f64;
            let m = if st.ref_mode {
                st.n_slot[k]
            } else {
                st.n_universe - st.n_slot[s]
            } as f64;
            let big_n = n + m;
            let mut c: Cols = Default::default();
            for col in c.iter_mut() {
                col.reserve_exact(n_genes);
            }
            for g in 0..n_genes {
                let row = &stats[g * ns..(g + 1) * ns];
                let me = row[s];
                let (out_sum, out_nnz) = if st.ref_mode {
                    (row[k].sum, row[k].nnz)
                } else if presto {
                    let cs: f64 = row.iter().map(|o| o.sum).sum();
                    (cs - me.sum, row.iter().map(|o| o.nnz).sum::<u64>() - me.nnz)
                } else {
                    let mut su = 0.0;
                    let mut nz = 0;
                    for (q, o) in row.iter().enumerate() {
                        if q != s {
                            su += o.sum;
                            nz += o.nnz;
                        }
                    }
                    (su, nz)
                };
                let (u, w) = if st.ref_mode {
                    (me.rank, me.rank + n * (n + 1.0) / 2.0)
                } else {
                    (me.rank - n * (n + 1.0) / 2.0, me.rank)
                };
                let n1n2 = n * m;
                let (z, mean_in, mean_out, lfc, pin, pout);
                if presto {
                    let mut d = u - 0.5 * n1n2;
                    d -= d.signum() * 0.5 * (d != 0.0) as u8 as f64;
                    let x1 = big_n.powf(3.0) - big_n;
                    let x2 = 1.0 / (12.0 * (big_n * big_n - big_n));
                    let rhs = (x1 - me.tie) * x2;
                    z = d / (n1n2 * rhs).sqrt();
                    mean_in = me.sum / n;
                    mean_out = out_sum / m;
                    lfc = mean_in - mean_out;
                    pin = 100.0 * (me.nnz as f64 / n);
                    pout = 100.0 * (out_nnz as f64 / m);
                } else {
                    let tc = if opt.tie_correct && big_n >= 2.0 {
                        1.0 - me.tie / (big_n.powf(3.0) - big_n)
                    } else {
                        1.0
                    };
                    let sd = (tc * n * m * (big_n + 1.0) / 12.0).sqrt();
                    let zz = (w - n * ((big_n + 1.0) / 2.0)) / sd;
                    z = if zz.is_nan() { 0.0 } else { zz };
                    mean_in = me.sum / n;
                    mean_out = out_sum / m;
                    lfc = ((expm1(mean_in) + 1e-9) / (expm1(mean_out) + 1e-9)).log2();
                    pin = me.nnz as f64 / n;
                    pout = out_nnz as f64 / m;
                }
                c[0].push(z);
                c[1].push(lfc);
                c[2].push(two_sided_p(z));
                c[4].push(pin);
                c[5].push(pout);
                c[6].push(u / n1n2);
                c[7].push(u);
                c[8].push(mean_in);
                c[9].push(mean_out);
            }
            c[3] = bh(&c[2], presto);
            c
        })
        .collect();

    let rows = k * n_genes;
    let mut res = WilcoxonResult {
        n_genes,
        tested: st.tested.clone(),
        n_in: st.n_slot[..k].to_vec(),
        n_out: (0..k)
            .map(|s| {
                if st.ref_mode {
                    st.n_slot[k]
                } else {
                    st.n_universe - st.n_slot[s]
                }
            })
            .collect(),
        group: Vec::with_capacity(rows),
        gene: Vec::with_capacity(rows),
        score: Vec::with_capacity(rows),
        logfc: Vec::with_capacity(rows),
        pval: Vec::with_capacity(rows),
        padj: Vec::with_capacity(rows),
        pts: Vec::with_capacity(rows),
        pts_rest: Vec::with_capacity(rows),
        auc: Vec::with_capacity(rows),
        u: Vec::with_capacity(rows),
        mean_in: Vec::with_capacity(rows),
        mean_out: Vec::with_capacity(rows),
    };
    for (s, c) in per_group.into_iter().enumerate() {
        res.group.extend(std::iter::repeat_n(st.tested[s], n_genes));
        res.gene.extend(0..n_genes as u32);
        let [score, logfc, pval, padj, pts, pts_rest, auc, u, mean_in, mean_out] = c;
        res.score.extend(score);
        res.logfc.extend(logfc);
        res.pval.extend(pval);
        res.padj.extend(padj);
        res.pts.extend(pts);
        res.pts_rest.extend(pts_rest);
        res.auc.extend(auc);
        res.u.extend(u);
        res.mean_in.extend(mean_in);
        res.mean_out.extend(mean_out);
    }
    res
}

// ---------------------------------------------------------------------------------------
// erfc, after FreeBSD msun s_erf.c (used by musl and Rust's libm):
//
// Copyright (C) 1993 by Sun Microsystems, Inc. All rights reserved.
// Developed at SunPro, a Sun Microsystems, Inc. business.
// Permission to use, copy, modify, and distribute this software is freely granted,
// provided that this notice is preserved.
//
// Error < 1 ulp; erfc(x) for x >= 0 underflows to 0 beyond x = 28 (|z| ~ 39.6).
// ---------------------------------------------------------------------------------------

mod erf {
    #![allow(clippy::excessive_precision)]

    const ERX: f64 = 8.45062911510467529297e-01;
    const PP: [f64; 5] = [
        1.28379167095512558561e-01,
        -3.25042107247001499370e-01,
        -2.84817495755985104766e-02,
        -5.77027029648944159157e-03,
        -2.37630166566501626084e-05,
    ];
    const QQ: [f64; 5] = [
        3.97917223959155352819e-01,
        6.50222499887672944485e-02,
        5.08130628187576562776e-03,
        1.32494738004321644526e-04,
        -3.96022827877536812320e-06,
    ];
    const PA: [f64; 7] = [
        -2.36211856075265944077e-03,
        4.14856118683748331666e-01,
        -3.72207876035701323847e-01,
        3.18346619901161753674e-01,
        -1.10894694282396677476e-01,
        3.54783043256182359371e-02,
        -2.16637559486879084300e-03,
    ];
    const QA: [f64; 6] = [
        1.06420880400844228286e-01,
        5.40397917702171048937e-01,
        7.18286544141962662868e-02,
        1.26171219808761642112e-01,
        1.36370839120290507362e-02,
        1.19844998467991074170e-02,
    ];
    const RA: [f64; 8] = [
        -9.86494403484714822705e-03,
        -6.93858572707181764372e-01,
        -1.05586262253232909814e+01,
        -6.23753324503260060396e+01,
        -1.62396669462573470355e+02,
        -1.84605092906711035994e+02,
        -8.12874355063065934246e+01,
        -9.81432934416914548592e+00,
    ];
    const SA: [f64; 8] = [
        1.96512716674392571292e+01,
        1.37657754143519042600e+02,
        4.34565877475229228821e+02,
        6.45387271733267880336e+02,
        4.29008140027567833386e+02,
        1.08635005541779435134e+02,
        6.57024977031928170135e+00,
        -6.04244152148580987438e-02,
    ];
    const RB: [f64; 7] = [
        -9.86494292470009928597e-03,
        -7.99283237680523006574e-01,
        -1.77579549177547519889e+01,
        -1.60636384855821916062e+02,
        -6.37566443368389627722e+02,
        -1.02509513161107724954e+03,
        -4.83519191608651397019e+02,
    ];
    const SB: [f64; 7] = [
        3.03380607434824582924e+01,
        3.25792512996573918826e+02,
        1.53672958608443695994e+03,
        3.19985821950859553908e+03,
        2.55305040643316442583e+03,
        4.74528541206955367215e+02,
        -2.24409524465858183362e+01,
    ];

    /// Horner evaluation, highest degree last: c0 + x c1 + x^2 c2 + ...
    #[inline]
    fn poly(x: f64, c: &[f64]) -> f64 {
        c.iter().rev().fold(0.0, |acc, &ci| acc * x + ci)
    }

    /// Complementary error function.
    pub fn erfc(x: f64) -> f64 {
        if x.is_nan() {
            return x;
        }
        if x < 0.0 {
            return 2.0 - erfc(-x);
        }
        if x < 0.84375 {
            if x < 1.3877787807814457e-17 {
                return 1.0 - x;
            }
            let z = x * x;
            let r = poly(z, &PP);
            let s = 1.0 + z * poly(z, &QQ);
            let y = r / s;
            if x < 0.25 {
                return 1.0 - (x + x * y);
            }
            return 0.5 - (x - 0.5 + x * y);
        }
        if x < 1.25 {
            let s = x - 1.0;
            let p = poly(s, &PA);
            let q = 1.0 + s * poly(s, &QA);
            return 1.0 - ERX - p / q;
        }
        if x >= 28.0 {
            return 0.0;
        }
        let s = 1.0 / (x * x);
        let (r, big_s) = if x < 1.0 / 0.35 {
            (poly(s, &RA), 1.0 + s * poly(s, &SA))
        } else {
            (poly(s, &RB), 1.0 + s * poly(s, &SB))
        };
        // exp(-x^2) split so that the leading part is exact
        let z = f64::from_bits(x.to_bits() & 0xffff_ffff_0000_0000);
        (-z * z - 0.5625).exp() * ((z - x) * (z + x) + r / big_s).exp() / x
    }
}

pub use erf::erfc;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::{CscOwned, DenseView};
    use proptest::prelude::*;

    /// Direct O(n m) Mann–Whitney reference on a dense genes x cells matrix.
    struct Naive {
        u: f64,
        z: f64,
        p: f64,
        mean_in: f64,
        mean_out: f64,
        frac_in: f64,
        frac_out: f64,
    }

    #[allow(clippy::too_many_arguments)]
    fn naive(
        d: &[f64],
        nrow: usize,
        gene: usize,
        groups: &[i32],
        g: i32,
        comparison: &dyn Fn(i32) -> bool,
        presto: bool,
        tie_correct: bool,
    ) -> Naive {
        let val = |j: usize| d[j * nrow + gene];
        let cmpv = |v: f64| if presto { v as f32 as f64 } else { v };
        let a: Vec<f64> = (0..groups.len())
            .filter(|&j| groups[j] == g)
            .map(val)
            .collect();
        let b: Vec<f64> = (0..groups.len())
            .filter(|&j| groups[j] != g && comparison(groups[j]))
            .map(val)
            .collect();
        let (n, m) = (a.len() as f64, b.len() as f64);
        let mut u = 0.0;
        for &x in &a {
            for &y in &b {
                let (x, y) = (cmpv(x), cmpv(y));
                if y < x {
                    u += 1.0;
                } else if y == x {
                    u += 0.5;
                }
            }
        }
        // tie blocks of the pooled sample
        let mut pooled: Vec<f64> = a.iter().chain(&b).map(|&v| cmpv(v)).collect();
        pooled.sort_by(|x, y| x.partial_cmp(y).unwrap());
        let mut blocks = vec![];
        let mut i = 0;
        while i < pooled.len() {
            let mut j = i + 1;
            while j < pooled.len() && pooled[j] == pooled[i] {
                j += 1;
            }
            blocks.push((j - i) as f64);
            i = j;
        }
        let big_n = n + m;
        let z = if presto {
            blocks.pop(); // presto never records the largest block
            let ties: f64 = blocks.iter().map(|t| t * t * t - t).sum();
            let var = n * m * (big_n.powi(3) - big_n - ties) / (12.0 * (big_n * big_n - big_n));
            let mut dd = u - n * m / 2.0;
            dd -= dd.signum() * 0.5 * (dd != 0.0) as u8 as f64;
            dd / var.sqrt()
        } else {
            let ties: f64 = blocks.iter().map(|t| t * t * t - t).sum();
            let tc = if tie_correct {
                1.0 - ties / (big_n.powi(3) - big_n)
            } else {
                1.0
            };
            let z = (u - n * m / 2.0) / (tc * n * m * (big_n + 1.0) / 12.0).sqrt();
            if z.is_nan() {
                0.0
            } else {
                z
            }
        };
        Naive {
            u,
            z,
            p: two_sided_p(z),
            mean_in: a.iter().sum::<f64>() / n,
            mean_out: b.iter().sum::<f64>() / m,
            frac_in: a.iter().filter(|&&v| v != 0.0).count() as f64 / n,
            frac_out: b.iter().filter(|&&v| v != 0.0).count() as f64 / m,
        }
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs()))
    }

    /// Check every row of `r` against the naive reference.
    fn check_against_naive(
        d: &[f64],
        nrow: usize,
        groups: &[i32],
        r: &WilcoxonResult,
        opt: &WilcoxonOptions,
    ) -> Result<(), String> {
        let presto = opt.flavor == Flavor::Presto;
        let tested: Vec<i32> = r.tested.iter().map(|&g| g as i32).collect();
        for (row, (&g, &gene)) in r.group.iter().zip(&r.gene).enumerate() {
            let g = g as i32;
            let comparison: Box<dyn Fn(i32) -> bool> = match (opt.reference, presto) {
                (Reference::Group(rf), _) => Box::new(move |c| c == rf as i32),
                (Reference::Rest, true) => Box::new(|c| tested.contains(&c)),
                (Reference::Rest, false) => Box::new(|_| true),
            };
            let nv = naive(
                d,
                nrow,
                gene as usize,
                groups,
                g,
                &*comparison,
                presto,
                opt.tie_correct,
            );
            let scale = if presto { 100.0 } else { 1.0 };
            let checks = [
                ("u", r.u[row], nv.u),
                ("z", r.score[row], nv.z),
                ("p", r.pval[row], nv.p),
                ("mean_in", r.mean_in[row], nv.mean_in),
                ("mean_out", r.mean_out[row], nv.mean_out),
                ("pts", r.pts[row], scale * nv.frac_in),
                ("pts_rest", r.pts_rest[row], scale * nv.frac_out),
            ];
            for (what, got, want) in checks {
                if !close(got, want, 1e-10) {
                    return Err(format!(
                        "group {g} gene {gene}: {what} = {got}, reference {want}"
                    ));
                }
            }
            let n = r.n_in[r.tested.iter().position(|&t| t as i32 == g).unwrap()] as f64;
            let m = r.n_out[r.tested.iter().position(|&t| t as i32 == g).unwrap()] as f64;
            if !close(r.auc[row], nv.u / (n * m), 1e-12) {
                return Err(format!("auc mismatch at row {row}"));
            }
        }
        Ok(())
    }

    fn run(
        d: &[f64],
        nrow: usize,
        ncol: usize,
        groups: &[i32],
        n_groups: usize,
        tested: Option<&[usize]>,
        opt: &WilcoxonOptions,
    ) -> ScResult<WilcoxonResult> {
        let s = CscOwned::from_dense(nrow, ncol, d);
        wilcoxon(&ExprMatrix::Csc(s.view()), groups, n_groups, tested, opt)
    }

    #[test]
    fn erfc_matches_known_values() {
        // 2 * pnorm(-z) from R / scipy
        let cases = [
            (0.0, 1.0),
            (0.5, 0.6170750774519738),
            (1.0, 0.3173105078629141),
            (1.959963984540054, 0.05000000000000002),
            (2.0, 0.04550026389635842),
            (3.0, 0.002699796063260189),
            (5.0, 5.733031437583878e-07),
            (10.0, 1.523970604832105e-23),
            (20.0, 5.507248237212467e-89),
            (37.0, 1.1451142445049154e-299),
        ];
        // reference values from mpmath at 40 digits
        for (z, p) in cases {
            let got = two_sided_p(z);
            assert!((got - p).abs() <= 3e-15 * p, "z={z}: {got} vs {p}");
            assert_eq!(two_sided_p(-z), got);
        }
        assert_eq!(erfc(30.0), 0.0);
        assert!((erfc(-1.0) - 1.842700792949715).abs() < 1e-15);
    }

    #[test]
    fn hand_example_no_ties() {
        // one gene, 6 cells: group 0 = {1,2,3}, group 1 = {4,5,6}
        let d = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let groups = [0, 0, 0, 1, 1, 1];
        let r = run(&d, 1, 6, &groups, 2, None, &WilcoxonOptions::default()).unwrap();
        // group 0: W = 6, U = 0, z = (6 - 3*7/2) / sqrt(3*3*7/12)
        let z = (6.0 - 10.5) / (63.0f64 / 12.0).sqrt();
        assert_eq!(r.tested, vec![0, 1]);
        assert_eq!(r.u, vec![0.0, 9.0]);
        assert_eq!(r.auc, vec![0.0, 1.0]);
        assert!((r.score[0] - z).abs() < 1e-15 && (r.score[1] + z).abs() < 1e-15);
        assert!((r.pval[0] - 0.049534613435626706).abs() < 1e-14);
        assert_eq!(r.mean_in, vec![2.0, 5.0]);
        assert_eq!(r.mean_out, vec![5.0, 2.0]);
        // scanpy lfc: log2((expm1(2)+1e-9)/(expm1(5)+1e-9))
        let lfc = ((2f64.exp_m1() + 1e-9) / (5f64.exp_m1() + 1e-9)).log2();
        assert!((r.logfc[0] - lfc).abs() < 1e-14);
        // presto: continuity correction moves |d| = 4.5 to 4.0
        let opt = WilcoxonOptions {
            flavor: Flavor::Presto,
            ..Default::default()
        };
        let r = run(&d, 1, 6, &groups, 2, None, &opt).unwrap();
        let zp = -4.0 / (63.0f64 / 12.0).sqrt();
        assert!((r.score[0] - zp).abs() < 1e-15);
        assert_eq!(r.logfc, vec![-3.0, 3.0]);
        assert_eq!(r.pts, vec![100.0, 100.0]);
    }

    #[test]
    fn hand_example_zeros_ties_negatives() {
        // values: group 0 = {0, 0, 2, -1}, group 1 = {0, 2, 2, 5}; sorted pooled:
        // -1 | 0 0 0 | 2 2 2 | 5  -> ranks 1 | 3 3 3 | 6 6 6 | 8
        let d = [0.0, 0.0, 2.0, -1.0, 0.0, 2.0, 2.0, 5.0];
        let groups = [0, 0, 0, 0, 1, 1, 1, 1];
        let opt = WilcoxonOptions {
            tie_correct: true,
            ..Default::default()
        };
        let r = run(&d, 1, 8, &groups, 2, None, &opt).unwrap();
        let w0 = 3.0 + 3.0 + 6.0 + 1.0;
        assert_eq!(r.u[0], w0 - 10.0);
        assert_eq!(r.u[1], 36.0 - w0 - 10.0);
        let tc = 1.0 - (24.0 + 24.0) / (512.0 - 8.0);
        let z = (w0 - 4.0 * 4.5) / f64::sqrt(tc * 16.0 * 9.0 / 12.0);
        assert!((r.score[0] - z).abs() < 1e-15);
        assert_eq!(r.pts, vec![0.5, 0.75]);
        // presto drops the largest block ({5}, a singleton): both blocks of 3 stay
        let opt = WilcoxonOptions {
            flavor: Flavor::Presto,
            ..Default::default()
        };
        let r = run(&d, 1, 8, &groups, 2, None, &opt).unwrap();
        let var = 16.0 * (504.0 - 48.0) / (12.0 * 56.0);
        assert!((r.score[0] - (w0 - 10.0 - 8.0 + 0.5) / f64::sqrt(var)).abs() < 1e-15);
    }

    #[test]
    fn explicit_zeros_are_zeros() {
        // 1 gene x 4 cells, explicit zero stored for cell 1
        let s = CscOwned {
            nrow: 1,
            ncol: 4,
            p: vec![0, 1, 2, 2, 3],
            i: vec![0, 0, 0],
            x: vec![1.0, 0.0, 3.0],
        };
        let d = s.to_dense();
        let groups = [0, 0, 1, 1];
        for flavor in [Flavor::Scanpy, Flavor::Presto] {
            let opt = WilcoxonOptions {
                flavor,
                ..Default::default()
            };
            let a = wilcoxon(&ExprMatrix::Csc(s.view()), &groups, 2, None, &opt).unwrap();
            let b = run(&d, 1, 4, &groups, 2, None, &opt).unwrap();
            assert_eq!(a, b);
        }
    }

    #[test]
    fn na_cells_scanpy_rest_presto_drop() {
        let d = [1.0, 2.0, 3.0, 4.0, 5.0, 0.5];
        let groups = [0, 0, 1, 1, -1, -1];
        let r = run(&d, 1, 6, &groups, 2, None, &WilcoxonOptions::default()).unwrap();
        assert_eq!(r.n_in, vec![2, 2]);
        assert_eq!(r.n_out, vec![4, 4]);
        check_against_naive(&d, 1, &groups, &r, &WilcoxonOptions::default()).unwrap();
        let opt = WilcoxonOptions {
            flavor: Flavor::Presto,
            ..Default::default()
        };
        let r = run(&d, 1, 6, &groups, 2, None, &opt).unwrap();
        assert_eq!(r.n_out, vec![2, 2]);
        check_against_naive(&d, 1, &groups, &r, &opt).unwrap();
    }

    #[test]
    fn constant_and_all_zero_genes() {
        // gene 0 all zero, gene 1 constant 2
        let d: Vec<f64> = (0..6).flat_map(|_| [0.0, 2.0]).collect();
        let groups = [0, 0, 0, 1, 1, 1];
        for tie_correct in [false, true] {
            let opt = WilcoxonOptions {
                tie_correct,
                ..Default::default()
            };
            let r = run(&d, 2, 6, &groups, 2, None, &opt).unwrap();
            assert_eq!(r.score, vec![0.0; 4]);
            assert_eq!(r.pval, vec![1.0; 4]);
            assert_eq!(r.padj, vec![1.0; 4]);
            assert_eq!(r.logfc[0], 0.0);
        }
        let opt = WilcoxonOptions {
            flavor: Flavor::Presto,
            ..Default::default()
        };
        let r = run(&d, 2, 6, &groups, 2, None, &opt).unwrap();
        assert_eq!(r.pval, vec![1.0; 4]);
        assert_eq!(r.auc, vec![0.5; 4]);
    }

    #[test]
    fn reference_mode_matches_naive() {
        let d = [
            0.0, 1.0, 2.0, 2.0, 0.0, 0.0, 3.0, 1.0, 1.0, 0.0, 0.0, 2.0, 5.0, 0.0, 1.0, 4.0,
        ];
        let groups = [0, 0, 2, 1, 1, -1, 2, 2];
        for tie_correct in [false, true] {
            let opt = WilcoxonOptions {
                reference: Reference::Group(2),
                tie_correct,
                ..Default::default()
            };
            let r = run(&d, 2, 8, &groups, 3, None, &opt).unwrap();
            assert_eq!(r.tested, vec![0, 1]);
            assert_eq!(r.n_out, vec![3, 3]);
            check_against_naive(&d, 2, &groups, &r, &opt).unwrap();
        }
    }

    #[test]
    fn presto_float32_ties() {
        // 1 and 1 + 1e-9 are one value for presto, two for scanpy
        let d = [1.0, 1.0, 1.0 + 1e-9, 1.0 + 1e-9];
        let groups = [0, 0, 1, 1];
        let opt = WilcoxonOptions {
            flavor: Flavor::Presto,
            ..Default::default()
        };
        let r = run(&d, 1, 4, &groups, 2, None, &opt).unwrap();
        assert_eq!(r.u, vec![2.0, 2.0]);
        let r = run(&d, 1, 4, &groups, 2, None, &WilcoxonOptions::default()).unwrap();
        assert_eq!(r.u, vec![0.0, 4.0]);
    }

    #[test]
    fn presto_mid_rank_replays_float32() {
        for (a, t) in [(0, 1), (5, 3), (1000, 1000), (4000, 2)] {
            assert_eq!(presto_mid_rank(a, t), a as f64 + (t as f64 + 1.0) / 2.0);
        }
        // a block of 10,000 at the start: the float32 sum of 0..9999 is inexact
        let mut s = 0.0f32;
        for q in 1..10000 {
            s += q as f32;
        }
        let want = ((s / 10000.0f32) + 1.0f32) as f64;
        assert_eq!(presto_mid_rank(0, 10000), want);
        assert_ne!(want, 5000.5);
    }

    #[test]
    fn scanpy_presto_relation_without_ties() {
        // all values distinct and non-zero: same U; presto z = (|d| - 0.5) / sigma
        let ncol = 40;
        let d: Vec<f64> = (0..ncol).map(|j| ((j * 37) % 41) as f64 + 0.25).collect();
        let groups: Vec<i32> = (0..ncol as i32).map(|j| j % 3).collect();
        let s = run(&d, 1, ncol, &groups, 3, None, &WilcoxonOptions::default()).unwrap();
        let p = run(
            &d,
            1,
            ncol,
            &groups,
            3,
            None,
            &WilcoxonOptions {
                flavor: Flavor::Presto,
                ..Default::default()
            },
        )
        .unwrap();
        for row in 0..3 {
            assert_eq!(s.u[row], p.u[row]);
            let (n, m) = (s.n_in[row] as f64, s.n_out[row] as f64);
            let sigma = (n * m * (ncol as f64 + 1.0) / 12.0).sqrt();
            let dd = s.score[row] * sigma;
            let want = (dd - dd.signum() * 0.5) / sigma;
            assert!((p.score[row] - want).abs() < 1e-12);
            // continuity correction can only raise the p-value
            assert!(p.pval[row] >= s.pval[row]);
        }
    }

    #[test]
    fn bh_matches_formula() {
        let p = [0.01, 0.04, 0.03, 0.2, 0.04];
        // sorted: .01 .03 .04 .04 .2 -> *5/i: .05 .075 .05 .0625 .2 -> cummin from top
        let want = [0.05, 0.05, 0.05, 0.2, 0.05];
        for r_style in [false, true] {
            let q = bh(&p, r_style);
            for (a, b) in q.iter().zip(want) {
                assert!((a - b).abs() < 1e-15, "{q:?}");
            }
        }
        assert_eq!(bh(&[0.9, 1.0], false), vec![1.0, 1.0]);
    }

    #[test]
    fn errors() {
        let d = [1.0, 2.0, 3.0, 4.0];
        let o = WilcoxonOptions::default();
        // group of one cell
        let e = run(&d, 1, 4, &[0, 0, 0, 1], 2, None, &o).unwrap_err();
        assert!(matches!(&e, ScError::Groups(m) if m.contains("group code 1")));
        // unused level in scanpy flavour
        assert!(matches!(
            run(&d, 1, 4, &[0, 0, 1, 1], 3, None, &o),
            Err(ScError::Groups(_))
        ));
        // ... is fine when not tested, and skipped by presto
        assert!(run(&d, 1, 4, &[0, 0, 1, 1], 3, Some(&[0, 1]), &o).is_ok());
        let po = WilcoxonOptions {
            flavor: Flavor::Presto,
            ..Default::default()
        };
        let r = run(&d, 1, 4, &[0, 0, 1, 1], 3, None, &po).unwrap();
        assert_eq!(r.tested, vec![0, 1]);
        // presto: single cell groups allowed, one group is not
        assert!(run(&d, 1, 4, &[0, 0, 0, 1], 2, None, &po).is_ok());
        assert!(matches!(
            run(&d, 1, 4, &[0, 0, 0, 0], 2, None, &po),
            Err(ScError::Groups(_))
        ));
        // presto has no reference
        let pr = WilcoxonOptions {
            reference: Reference::Group(0),
            ..po
        };
        assert!(matches!(
            run(&d, 1, 4, &[0, 0, 1, 1], 2, None, &pr),
            Err(ScError::Input(_))
        ));
        // NaN
        let dn = [1.0, f64::NAN, 3.0, 4.0];
        assert!(matches!(
            run(&dn, 1, 4, &[0, 0, 1, 1], 2, None, &o),
            Err(ScError::Value(_))
        ));
        // NaN in a cell presto drops is fine
        assert!(run(&dn, 1, 4, &[0, -1, 1, 1], 2, None, &po).is_ok());
        // dims, codes, duplicates, reference only
        assert!(matches!(
            run(&d, 1, 4, &[0, 0, 1], 2, None, &o),
            Err(ScError::Dims(_))
        ));
        assert!(matches!(
            run(&d, 1, 4, &[0, 0, 1, 5], 2, None, &o),
            Err(ScError::Groups(_))
        ));
        assert!(matches!(
            run(&d, 1, 4, &[0, 0, 1, 1], 2, Some(&[0, 0]), &o),
            Err(ScError::Input(_))
        ));
        let ro = WilcoxonOptions {
            reference: Reference::Group(1),
            ..o
        };
        assert!(matches!(
            run(&d, 1, 4, &[0, 0, 1, 1], 2, Some(&[1]), &ro),
            Err(ScError::Input(_))
        ));
        // unsorted CSC
        let s = CscOwned {
            nrow: 2,
            ncol: 1,
            p: vec![0, 2],
            i: vec![1, 0],
            x: vec![1.0, 2.0],
        };
        assert!(matches!(
            wilcoxon(&ExprMatrix::Csc(s.view()), &[0], 1, None, &o),
            Err(ScError::Dims(_)) | Err(ScError::Groups(_))
        ));
        let s2 = CscOwned {
            nrow: 2,
            ncol: 2,
            p: vec![0, 2, 2],
            i: vec![1, 0],
            x: vec![1.0, 2.0],
        };
        assert!(matches!(
            wilcoxon(&ExprMatrix::Csc(s2.view()), &[0, 0], 1, None, &o),
            Err(ScError::Dims(_))
        ));
        assert!(matches!(
            run(
                &d,
                1,
                4,
                &[0, 0, 1, 1],
                2,
                None,
                &WilcoxonOptions {
                    log_base: Some(1.0),
                    ..o
                }
            ),
            Err(ScError::Input(_))
        ));
    }

    #[test]
    fn large_gene_uses_radix_and_fixup() {
        // 3000 cells, values close together so the 32-bit window collides, with ties
        let ncol = 3000;
        let d: Vec<f64> = (0..ncol)
            .map(|j| {
                if j % 7 == 0 {
                    0.0
                } else if j % 11 == 0 {
                    -1.0 - (j % 5) as f64 * 1e-15
                } else {
                    1.0 + ((j * 7919) % 997) as f64 * 1e-13
                }
            })
            .collect();
        let groups: Vec<i32> = (0..ncol as i32).map(|j| (j * 13 % 5) - 1).collect();
        for flavor in [Flavor::Scanpy, Flavor::Presto] {
            for tie_correct in [false, true] {
                let opt = WilcoxonOptions {
                    flavor,
                    tie_correct,
                    ..Default::default()
                };
                let r = run(&d, 1, ncol, &groups, 4, None, &opt).unwrap();
                check_against_naive(&d, 1, &groups, &r, &opt).unwrap();
            }
        }
    }

    #[test]
    fn slot_layout_with_window_collisions() {
        // positive values only (the slot layout), log1p-like: many exact ties and values a
        // few ulps apart, so windows collide in runs that hold several keys
        for ncol in [50usize, 3000, 70_000] {
            let d: Vec<f64> = (0..ncol)
                .map(|j| {
                    let h = (j as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
                    match h % 5 {
                        0 => 0.0,
                        1 => (1.0 + (h % 40) as f64 / 1000.0f64).ln_1p(),
                        2 => 0.7 + (h % 9) as f64 * f64::EPSILON,
                        3 => 2.5,
                        _ => 1.0 + (h % 1000) as f64 * 1e-3,
                    }
                })
                .collect();
            check_sort::<false>(&d.iter().copied().filter(|&v| v != 0.0).collect::<Vec<_>>())
                .unwrap();
            if ncol > 5000 {
                // the 3-pass radix sort is checked above; the naive test is quadratic
                continue;
            }
            let groups: Vec<i32> = (0..ncol as i32).map(|j| (j * 13 % 7) - 1).collect();
            for (flavor, reference) in [
                (Flavor::Scanpy, Reference::Rest),
                (Flavor::Scanpy, Reference::Group(2)),
                (Flavor::Presto, Reference::Rest),
            ] {
                let opt = WilcoxonOptions {
                    flavor,
                    reference,
                    tie_correct: true,
                    ..Default::default()
                };
                let r = run(&d, 1, ncol, &groups, 6, None, &opt).unwrap();
                check_against_naive(&d, 1, &groups, &r, &opt).unwrap();
            }
        }
    }

    #[test]
    fn branch_free_walk_negative_only_and_big_blocks() {
        // the slot layout also holds genes of negative values only (all below the zeros),
        // with window runs of several keys, and tie blocks of thousands of values
        for ncol in [40usize, 900, 4000] {
            let d: Vec<f64> = (0..ncol)
                .map(|j| {
                    let h = (j as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
                    match h % 4 {
                        0 => 0.0,
                        1 => -0.3 - (h % 7) as f64 * f64::EPSILON,
                        2 => -1.5,
                        _ => -(1.0 + (h % 300) as f64 * 1e-4).ln_1p(),
                    }
                })
                .collect();
            let groups: Vec<i32> = (0..ncol as i32).map(|j| (j * 7 % 9) - 1).collect();
            for tie_correct in [false, true] {
                let opt = WilcoxonOptions {
                    tie_correct,
                    ..Default::default()
                };
                let r = run(&d, 1, ncol, &groups, 8, None, &opt).unwrap();
                check_against_naive(&d, 1, &groups, &r, &opt).unwrap();
            }
        }
    }

    #[test]
    fn chunking_does_not_change_results() {
        let (nrow, ncol) = (57, 90);
        let d: Vec<f64> = (0..nrow * ncol)
            .map(|k| {
                let h = (k * 2654435761) % 1000;
                if h < 600 {
                    0.0
                } else {
                    (h % 17) as f64 * 0.25 - 0.5
                }
            })
            .collect();
        let groups: Vec<i32> = (0..ncol as i32).map(|j| j % 5 - 1).collect();
        let s = CscOwned::from_dense(nrow, ncol, &d);
        let dense = DenseView::new(nrow, ncol, &d).unwrap();
        for opt in [
            WilcoxonOptions::default(),
            WilcoxonOptions {
                reference: Reference::Group(1),
                tie_correct: true,
                ..Default::default()
            },
            WilcoxonOptions {
                flavor: Flavor::Presto,
                ..Default::default()
            },
        ] {
            let one = wilcoxon_chunked(
                &ExprMatrix::Csc(s.view()),
                &groups,
                4,
                None,
                &opt,
                Some(1 << 40),
            )
            .unwrap();
            check_against_naive(&d, nrow, &groups, &one, &opt).unwrap();
            for chunk in [1, 7, 100] {
                for threads in [1, 2, 5] {
                    for m in [ExprMatrix::Csc(s.view()), ExprMatrix::Dense(dense)] {
                        let r = crate::threads::with_threads(threads, || {
                            wilcoxon_chunked(&m, &groups, 4, None, &opt, Some(chunk))
                        })
                        .unwrap()
                        .unwrap();
                        assert_eq!(r, one);
                    }
                }
            }
        }
    }

    /// Every field of two results, bit for bit (NaN included).
    fn same_bits(a: &WilcoxonResult, b: &WilcoxonResult) -> bool {
        let f = |r: &WilcoxonResult| -> Vec<u64> {
            r.stat_columns()
                .iter()
                .flat_map(|v| v.iter().map(|x| x.to_bits()))
                .collect()
        };
        (a.n_genes, &a.tested, &a.n_in, &a.n_out, &a.group, &a.gene)
            == (b.n_genes, &b.tested, &b.n_in, &b.n_out, &b.group, &b.gene)
            && f(a) == f(b)
    }

    #[test]
    fn packed_copy_matches_general_copy_and_falls_back() {
        // values of both signs over many binary orders, ties, explicit zeros, NA cells;
        // the packed copy (scanpy, CSC), the general copy, and packed copies whose window
        // misses some values (a chunk then falls back to the general copy) must agree bit
        // for bit, with any chunking and thread count
        let (nrow, ncol) = (41, 300);
        let d: Vec<f64> = (0..nrow * ncol)
            .map(|k| {
                let h = (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
                if k % nrow < 15 {
                    // the first genes: zeros and values in [1, 2) only, so that with the
                    // window from 1.0 their chunks stay packed until a later one falls
                    // back
                    return if h % 3 == 0 {
                        0.0
                    } else {
                        1.0 + ((h >> 8) % 9) as f64 / 9.0
                    };
                }
                match h % 10 {
                    0..=4 => 0.0,
                    5 => ((h >> 8) % 7) as f64 * 0.5,
                    6 => -(((h >> 8) % 5) as f64) * 0.25,
                    7 => ((h >> 8) % 1000) as f64 * 1e-3,
                    8 => (((h >> 8) % 40) as f64 - 20.0).exp2() * 1.5,
                    _ => ((h >> 8) % 97) as f64 + 1e6,
                }
            })
            .collect();
        let groups: Vec<i32> = (0..ncol as i32).map(|j| (j * 7) % 6 - 1).collect();
        let s = CscOwned::from_dense(nrow, ncol, &d);
        let m = ExprMatrix::Csc(s.view());
        for opt in [
            WilcoxonOptions::default(),
            WilcoxonOptions {
                tie_correct: true,
                ..Default::default()
            },
            WilcoxonOptions {
                reference: Reference::Group(2),
                tie_correct: true,
                ..Default::default()
            },
        ] {
            let general =
                wilcoxon_impl(&m, &groups, 5, None, &opt, None, KeyBase::General).unwrap();
            check_against_naive(&d, nrow, &groups, &general, &opt).unwrap();
            let sampled =
                wilcoxon_impl(&m, &groups, 5, None, &opt, None, KeyBase::Sampled).unwrap();
            assert!(same_bits(&sampled, &general));
            // windows starting at 1.0 (negatives and small values fall outside) or just
            // below the keys of 1e6 (most values fall outside)
            for c in [key64(1.0), key64(1e6) - 1] {
                for chunk in [None, Some(1), Some(200), Some(5000)] {
                    for threads in [1, 3] {
                        let r = crate::threads::with_threads(threads, || {
                            wilcoxon_impl(&m, &groups, 5, None, &opt, chunk, KeyBase::Fixed(c))
                        })
                        .unwrap()
                        .unwrap();
                        assert!(same_bits(&r, &general), "c {c:x} chunk {chunk:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn packed_copy_reports_nan() {
        let (nrow, ncol) = (3, 8);
        let mut d = vec![0.5; nrow * ncol];
        d[7] = f64::NAN;
        let groups: Vec<i32> = (0..ncol as i32).map(|j| j % 2).collect();
        let s = CscOwned::from_dense(nrow, ncol, &d);
        let m = ExprMatrix::Csc(s.view());
        let opt = WilcoxonOptions::default();
        // a window that holds the NaN's key, and the sampled one
        for kb in [
            KeyBase::Fixed(key64(0.5)),
            KeyBase::Fixed(SIGN64),
            KeyBase::Sampled,
        ] {
            let e = wilcoxon_impl(&m, &groups, 2, None, &opt, None, kb).unwrap_err();
            assert!(matches!(e, ScError::Value(_)), "{kb:?}");
        }
    }

    #[test]
    fn genes_of_many_sizes_reuse_scratch() {
        // 30 genes whose densities rise then fall, so the per-thread buffers shrink and
        // grow between genes; values with ties, negatives and near-collisions
        let (nrow, ncol) = (30, 600);
        let d: Vec<f64> = (0..nrow * ncol)
            .map(|k| {
                let (j, r) = (k / nrow, k % nrow);
                let density = 1.0 - (r as f64 - 15.0).abs() / 16.0;
                let h = ((k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 33) as f64
                    / (1u64 << 31) as f64;
                if h > density {
                    0.0
                } else if j % 5 == 0 {
                    -1.5
                } else {
                    1.0 + ((k * 7919) % 40) as f64 * 1e-12 * (1 + j % 3) as f64
                }
            })
            .collect();
        let groups: Vec<i32> = (0..ncol as i32).map(|j| (j * 7) % 4 - 1).collect();
        for opt in [
            WilcoxonOptions::default(),
            WilcoxonOptions {
                tie_correct: true,
                reference: Reference::Group(2),
                ..Default::default()
            },
            WilcoxonOptions {
                flavor: Flavor::Presto,
                ..Default::default()
            },
        ] {
            let r = crate::threads::with_threads(1, || run(&d, nrow, ncol, &groups, 3, None, &opt))
                .unwrap()
                .unwrap();
            check_against_naive(&d, nrow, &groups, &r, &opt).unwrap();
        }
    }

    #[test]
    fn many_threads_same_result() {
        let (nrow, ncol) = (300, 200);
        let d: Vec<f64> = (0..nrow * ncol)
            .map(|k| {
                let h = (k * 2654435761) % 1000;
                if h < 700 {
                    0.0
                } else {
                    (h % 13) as f64 * 0.5
                }
            })
            .collect();
        let groups: Vec<i32> = (0..ncol as i32).map(|j| j % 4).collect();
        let opt = WilcoxonOptions::default();
        let a = crate::threads::with_threads(1, || run(&d, nrow, ncol, &groups, 4, None, &opt))
            .unwrap()
            .unwrap();
        let b = crate::threads::with_threads(3, || run(&d, nrow, ncol, &groups, 4, None, &opt))
            .unwrap()
            .unwrap();
        assert_eq!(a, b);
    }

    fn arb_case() -> impl Strategy<Value = (usize, usize, Vec<f64>, Vec<bool>, Vec<i32>)> {
        (1usize..5, 6usize..24).prop_flat_map(|(nrow, ncol)| {
            (
                Just(nrow),
                Just(ncol),
                proptest::collection::vec(
                    prop_oneof![
                        4 => Just(0.0),
                        3 => (1i32..4).prop_map(|v| v as f64 * 0.5),
                        1 => (-3i32..0).prop_map(|v| v as f64),
                        1 => 0.0f64..3.0,
                    ],
                    nrow * ncol,
                ),
                proptest::collection::vec(any::<bool>(), nrow * ncol),
                proptest::collection::vec(-1i32..3, ncol),
            )
        })
    }

    /// Values built to collide in the sort window: ties, neighbours 1 ulp apart, a wide
    /// range, negatives, values that are zero as f32.
    fn arb_values() -> impl Strategy<Value = Vec<f64>> {
        proptest::collection::vec(
            prop_oneof![
                3 => (0i32..20).prop_map(|v| 1.0 + v as f64 * f64::EPSILON),
                2 => (-5i32..5).prop_map(|v| v as f64 * 0.5),
                1 => (1i32..4).prop_map(|v| 1e-300 * v as f64),
                1 => -1e6f64..1e6,
                1 => (0i32..6).prop_map(|v| 1e30 + v as f64 * 1e15),
            ],
            0..700,
        )
        .prop_map(|v| v.into_iter().filter(|&x| x != 0.0).collect())
    }

    fn check_sort<const PRESTO: bool>(vals: &[f64]) -> Result<(), TestCaseError> {
        check_sort_layout::<PRESTO, false>(vals)?;
        check_sort_layout::<PRESTO, true>(vals)
    }

    /// Sorting and tie blocks in one layout (the slot layout only when the key range
    /// fits, as the kernel decides): the same (key, slot) sequence as a plain sort, blocks
    /// of equal keys in increasing order.
    fn check_sort_layout<const PRESTO: bool, const SLOT: bool>(
        vals: &[f64],
    ) -> Result<(), TestCaseError> {
        let mut sc = Scratch::default();
        let sb = 3u32;
        let codes: Vec<u16> = (0..vals.len()).map(|i| (i * 5 % 7) as u16).collect();
        let keys: Vec<u64> = vals
            .iter()
            .filter(|&&v| ranked::<PRESTO>(v))
            .map(|&v| full_key::<PRESTO>(v))
            .collect();
        let (lo, hi) = (
            keys.iter().copied().min().unwrap_or(u64::MAX),
            keys.iter().copied().max().unwrap_or(0),
        );
        if SLOT && (keys.is_empty() || (64 - (hi - lo).leading_zeros()) + sb > 64) {
            return Ok(());
        }
        sc.packed.clear();
        for (i, &v) in vals.iter().enumerate() {
            if ranked::<PRESTO>(v) {
                sc.packed
                    .push(raw_entry::<PRESTO>(full_key::<PRESTO>(v), i));
            }
        }
        let shift = sort_gene::<PRESTO, SLOT>(keys.len(), lo, hi, &codes, sb, &mut sc);
        let mut packed = sc.packed.clone();
        let (mut fixed, mut a, mut blocks) = (0, 0, vec![]);
        while a < packed.len() {
            let b = block_end::<PRESTO, SLOT>(vals, &mut packed, shift, sb, a, &mut fixed);
            blocks.push((a, b));
            a = b;
        }
        let smask = (1u64 << sb) - 1;
        let mut got: Vec<(u64, u16)> = packed
            .iter()
            .map(|&p| {
                if SLOT {
                    ((p >> sb) + lo, (p & smask) as u16)
                } else {
                    let i = (p & IDX_MASK) as usize;
                    (full_key::<PRESTO>(vals[i]), codes[i])
                }
            })
            .collect();
        let mut want: Vec<(u64, u16)> = vals
            .iter()
            .enumerate()
            .filter(|(_, &v)| ranked::<PRESTO>(v))
            .map(|(i, &v)| (full_key::<PRESTO>(v), codes[i]))
            .collect();
        want.sort_unstable();
        for (q, &(a, b)) in blocks.iter().enumerate() {
            prop_assert!(got[a..b].iter().all(|g| g.0 == got[a].0));
            if q > 0 {
                prop_assert!(got[a - 1].0 < got[a].0);
            }
            // the order within a tie block does not matter
            got[a..b].sort_unstable();
        }
        prop_assert_eq!(&got, &want);
        Ok(())
    }

    #[test]
    fn lower_bound_near_matches_partition_point() {
        let v: Vec<i32> = (0..300).map(|k| k * 3 / 2).collect();
        for x in -2..460 {
            let want = v.partition_point(|&r| r < x);
            for guess in [0, 1, 7, 150, 299, 300, 1000] {
                assert_eq!(lower_bound_near(&v, x, guess), want, "x {x} guess {guess}");
            }
            assert_eq!(lower_bound_near(&v[..0], x, 3), 0);
        }
    }

    #[test]
    fn sort_gene_all_sizes() {
        // every radix path (8-bit/2 passes, 11-bit/2, 11-bit/3), with ties, values one ulp
        // apart (window collisions), negatives and a wide range
        for n in [10usize, 100, 900, 1500, 5000, 70_000] {
            let vals: Vec<f64> = (0..n)
                .map(|i| {
                    let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
                    match h % 6 {
                        0 => 1.0 + (h % 50) as f64 * f64::EPSILON,
                        1 => -((h % 7) as f64) - 0.5,
                        2 => (h % 1000) as f64 * 1e-3 + 0.5,
                        3 => 2.0,
                        4 => 1e200 * (1.0 + (h % 3) as f64),
                        _ => 1e-200 * (1.0 + (h % 5) as f64),
                    }
                })
                .collect();
            check_sort::<false>(&vals).unwrap();
            check_sort::<true>(&vals).unwrap();
        }
    }

    proptest! {
        #[test]
        fn sort_gene_is_exact(vals in arb_values()) {
            check_sort::<false>(&vals)?;
            check_sort::<true>(&vals)?;
        }

        #[test]
        fn matches_naive_sparse_and_dense(
            (nrow, ncol, d, store_zero, groups) in arb_case(),
            tie_correct in any::<bool>(),
            which in 0usize..4,
        ) {
            // every group gets >= 2 cells unless `which` says otherwise
            let mut groups = groups;
            if which != 3 {
                groups[..6].copy_from_slice(&[0, 0, 1, 1, 2, 2]);
            }
            // a CSC with some explicit zeros
            let mut p = vec![0i32];
            let (mut ii, mut x) = (vec![], vec![]);
            for j in 0..ncol {
                for r in 0..nrow {
                    let v = d[j * nrow + r];
                    if v != 0.0 || store_zero[j * nrow + r] {
                        ii.push(r as i32);
                        x.push(v);
                    }
                }
                p.push(ii.len() as i32);
            }
            let s = CscOwned { nrow, ncol, p, i: ii, x };
            let (flavor, reference) = match which {
                0 => (Flavor::Scanpy, Reference::Rest),
                1 => (Flavor::Scanpy, Reference::Group(2)),
                _ => (Flavor::Presto, Reference::Rest),
            };
            let tested: Option<Vec<usize>> = if which == 3 { Some(vec![1, 0]) } else { None };
            let opt = WilcoxonOptions { flavor, reference, tie_correct, log_base: None };
            let sp = wilcoxon(&ExprMatrix::Csc(s.view()), &groups, 3, tested.as_deref(), &opt);
            let de = wilcoxon(
                &ExprMatrix::Dense(DenseView::new(nrow, ncol, &d).unwrap()),
                &groups, 3, tested.as_deref(), &opt,
            );
            match (sp, de) {
                (Ok(a), Ok(b)) => {
                    prop_assert_eq!(&a.u, &b.u);
                    prop_assert_eq!(&a.score, &b.score);
                    prop_assert_eq!(&a.pts, &b.pts);
                    prop_assert_eq!(&a.padj, &b.padj);
                    if let Err(e) = check_against_naive(&d, nrow, &groups, &a, &opt) {
                        prop_assert!(false, "{}", e);
                    }
                    // BH by the definition
                    for k in 0..a.tested.len() {
                        let ps = &a.pval[k * nrow..(k + 1) * nrow];
                        for (i, &pi) in ps.iter().enumerate() {
                            let want = ps.iter().filter(|&&q| q >= pi)
                                .map(|&q| q * nrow as f64 / ps.iter().filter(|&&o| o <= q).count() as f64)
                                .fold(1.0f64, f64::min);
                            prop_assert!((a.padj[k * nrow + i] - want).abs() < 1e-12);
                        }
                    }
                }
                (Err(a), Err(b)) => {
                    prop_assert_eq!(a.kind(), b.kind());
                    prop_assert_eq!(a.kind(), "groups");
                }
                (a, b) => prop_assert!(false, "sparse {:?} vs dense {:?}", a.is_ok(), b.is_ok()),
            }
        }
    }
}
