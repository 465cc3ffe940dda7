#!/usr/bin/env bash
# The GPU measurements still owed by the open issues, in priority order, each time-boxed so that one
# device call (10 min) returns partial results. Run from the repo root on the GPU machine:
#   bash benchmarks/gpu_pending.sh OUT_DIR [SECTION ...]
# Sections (the default list, in the order given by SECTIONS below, is what is still owed):
#   verify       issue 3 (timed in the sixth 2026-12-04 session): windows of >= 4096
#                keys on the dense class's tiles (64x128, PACK 2, TMA; +9% in round 4 at 16K) and block-sparse
#                masks reading one bit per tile (no per-element gather), against flex, 4K / 16K / 64K
#   grid-full    issue 4: the long-context grid at GRID_LENS (default 1K,2K), appended to the committed H200
#                records in benchmarks/results/h200-grid-full/ (copy them back there; a re-run skips recorded
#                cases). Complete since the fourth 2026-12-04 session: re-measures only what is deleted there.
#   linear-gla   issue 5: GLA vs flash-linear-attention only (B=8, T=2048), with its kernel profile, no check
#                (fla's first GLA calls spend ~95 s (fwd) and ~160 s (fwd+bwd) in its autotuner: LINEAR_S >= 300;
#                the fifth 2026-12-04 session's run with the check in front ended before fla's fwd+bwd)
#   linear-fla   issue 5: simple GLA and Gated DeltaNet fwd+bwd vs fla with fla's Hopper guard (#640) bypassed
#                (--fla-unguarded: timed, and its outputs / gradients compared with ours), B=8 T=2048 (fla carry;
#                timed in the seventh 2026-12-04 session: simple GLA 1.161 vs fla 1.933 ms, GDN 2.626 vs 1.900)
#   linear-sdpa  issue 5: every op vs SDPA at the issue's token counts from T = 8K on (B*T >= 16K: 2x8192,
#                1x16384, 4x8192; then 1x8192 and 8x2048), KDA's kernel profile at 2x8192 (run with fla off the path)
#   kda-ib       issue 5: KDA's intra backward by tiles per Dk block (intra_b="split") and the Triton reverse
#                cumsum of dg: GPU checks (KDA variant included), the sweep at 8x2048 and 1x8192 (no fla needed)
#   kda-pre      issue 5: KDA's state kernels reading precomputed gate factors (cfg pre): the GPU checks, the sweep
#                at 2x8192 and 1x8192, then every op vs SDPA at 2x8192 / 1x8192 (no fla needed)
#   linear-scale issue 5: linear scaling with this session's kernels, every op at B=1 T=8K and 64K (target: 64K / 8K
#                <= 8.8; last measured 2026-12-03, before the fitted state tiles and the kept intermediates)
#   gla-fwd      issue 5: GLA's forward scores by (BC, BC) tiles (intra_f="split"): GPU checks, sweep at 8x2048 and
#                2x8192 (no fla needed)
#   delta-bwd    issue 5: the main backward kernel of Gated DeltaNet / KDA with 16 warps (b32w16, b64w16), the other
#                Dv blocks, the main backward in two kernels (main="split") and _prep with 8 warps, at 2x8192
#                (no fla needed)
#   linear-decode issue 5: the fused step kernels of GLA / Gated DeltaNet / KDA (and simple GLA) at B in {1, 16, 64},
#                GB/s against the H200's peak, against their PyTorch steps and, with fla on the path, fla's fused
#                recurrent kernels (run linear-check for their GPU check)
#   gdn-sweep    issue 5: Gated DeltaNet's config sweep and kernel profile at B=8 T=2048, the shape of the fla comparison
#                (fwd+bwd 2.626 ms vs fla's 1.900 in the seventh 2026-12-04 session; no fla needed); GDN_ONLY: the
#                variants (substrings), by default the state tiles, the split main backward, _prep at 8 warps, T by
#                doubling and T apart from W / U0 (prep-split)
#   linear-packed issue 5: packed variable-length input (cu_seqlens), Gated DeltaNet fwd / fwd+bwd on PACKED_SETS
#                (default 64 sequences of 64-512 tokens, 128 of 128-2048, 512 of 16-128): the padded batches by the
#                cost model (padded tokens + a cost per group; thirteenth session), by cheaper / dearer groups, by the
#                greedy waste bound 1.25 (the rule before), against one call per sequence
#   gdn-fla      issue 5: gdn-sweep's variants and fla's Gated DeltaNet in one run (carry the fla wheel, PYTHONPATH=/tmp/site;
#                AUTOTUNE_TGZ=benchmarks/results/h200-2026-12-04-s7/call1/triton_autotune.tgz skips fla's autotuning,
#                but fla ran 2.708 ms with those picks against 2.075 autotuned afresh (tenth session): time fla without it):
#                each variant's ratio to fla from the same process, so the winner's comparison needs no second call;
#                GDN_VARIANTS: sweep variants ('+' combines) also timed through autograd in the speed table
#   fwd-lazy     issue 3: the forward's LAZY rescaling on the local and dense defaults (triton_pack_variants.py --round
#                7), PIPE (the next block's q K^T in flight during the softmax) on windows, and the backward default
#                after its FMA change, 16K, vs flex
#   bwd-kt       issue 3: the attention backward's tiles (triton_pack_variants.py --round 6: the dk/dv kernel keys by
#                queries (KT) and on its own tiles / warps, the dq kernel at 128x64 / 8 warps, dq by float32 atomics
#                from the dk/dv kernel (ATOMIC_DQ: 5 products per tile instead of 7)), 16K, vs flex
#   nbhd-orders  issue 3 (timed in the ninth session, 2026-12-05: in place 3.76-4.42x flex forward): the N-D neighborhoods through attention() (fwd, fwd+bwd, vs flex, 16K) with the tile order run
#                in place by the kernels' row maps (the new default: no gathers of q / k / v / out, no scatters of
#                the gradients), with only the query side mapped, and with the old gathers (triton_nbhd_variants.py
#                --orders; each order's outputs and gradients checked against float64 before it is timed), then
#                the backward's tiles on the in-place order (--bwd --in-place: no TMA there; dq by atomics evaluates
#                each tile's mask once instead of twice, KT)
#   nbhd-fwd     issue 3 (timed 2026-12-05 on an H100: IDX 1 + MERGE the new default): the neighborhoods' forward on the in-place order: block index a step ahead (IDX 1), MERGE,
#                LAZY, PIPE, 2 stages, 2 heads per program (triton_nbhd_variants.py --fwd-next --in-place), 16K, vs flex
#   kda-chunk    issue 5: KDA's intra kernels per chunk (intra_b="chunk": the backward per chunk and channel block,
#                all sub-chunks in one (BT, BK) tile; intra="chunk": the forward scores per chunk over channel
#                blocks; no spills at 32 / 8 warps and 64 / 8 warps, ptxas sm_90): GPU checks, the sweep at 2x8192
#                against the split defaults (1.57 + 0.58 ms of KDA's 5.2 there), every op vs SDPA at 2x8192
#   kda-dot      issue 5: KDA's and GLA's diagonal tiles as dots where a sub-chunk's gates span at most diag_lim nats
#                (cfg diag_lim / diag_lim_b, thirteenth session, opt-in): GPU checks (variants diag-dot included), the
#                sweeps at 2x8192 (dot-*), both profiles, every op vs SDPA at 2x8192 (no fla needed; LINEAR_S=400)
#   dots-on      issue 5: the dots as KDA's and GLA's 16-bit GPU default (fourteenth session): GPU checks (no-dot
#                variants included), the sweep's no-dot / limit-60 / 32-channel rows at 2x8192, both profiles, every
#                op vs SDPA at 2x8192, 8x2048, 4x8192 (no fla needed; LINEAR_S=300)
#   kda-main     issue 5: KDA's main backward (1.32 of 3.9 ms device time at 2x8192 on the H100 with the dots):
#                the two-kernel form, 16 warps, other Dv blocks (KDA_ONLY: sweep substrings)
#   main-regs    issue 5: the fused main backward of KDA / Gated DeltaNet with q, k, g read after its Dv loop and
#                T^T dW accumulated per Dv block (stack 1160 -> 248 / 1024 -> 584 B, ptxas sm_90): GPU checks, both
#                sweeps' main-backward variants at 2x8192, profiles, ops vs SDPA at 2x8192 and 4x8192
#   kda-rows     issue 5: KDA's gate factors (KE, QE) kept by the forward for the backward, QE read by _fwd_o
#                (fourteenth session): GPU checks (dp-dul, da16 among them), profile, the sweep's dp-dul / da16 rows
#                (dP in _bwd_dul; dA, dP stored in 16 bits; both opt-in) and rc rows (fifteenth session: dg written by
#                the intra backward, one program per chunk), every op vs SDPA at 2x8192, 1x16384, 4x8192, then
#                KDA and SDPA again in a second process (and at 1x32768)
#   kda-opt      issue 5 (fifteenth session): KDA through its autograd op, the default and the opt-in configs
#                (KDA_VARIANTS: sweep variant names, '+' combines), and SDPA at 2x8192 / 4x8192, then the
#                sweep of every opt-in KDA row at 2x8192 (dp-dul, da16, rc loop / launches, gc-rows, p16, a16, all-opt-in;
#                KDA_ONLY: other substrings). About 8 min; follow with kda-check
#   kda-check    issue 5: the GPU checks (every KDA check variant, the opt-in ones among them) and KDA's profile,
#                then GDN / KDA / SDPA at 2x8192, 1x16384, 4x8192, 1x32768 in a second process, with the default's
#                ablations through the op (KDA_VARIANTS; default: each of da16 / gc="rows" / a16 off, all three off)
#   (gluon, gluon-w4: rounds 10 and 11, the single-partition Gluon forward, removed in the eighteenth session)
#   gluon-ws     issue 3 (seventeenth session): the warp-specialised Gluon forward (GLUON="ws", PINGPONG): its GPU
#                tests, then round 12 against the Triton default and flex at 16K and 64K
#   gluon-ws128  issue 3 (seventeenth session): round 13, the warp-specialised Gluon forward on 128-key tiles (GPU
#                tests of that tile first)
#   gluon-wsp    issue 3 (written in the seventeenth session, NOT YET RUN; first in the queue): the persistent
#                warp-specialised Gluon forward (GLUON="wsp"): its GPU tests, then round 14 at 16K and window 1024 at 64K
#   gluon-order  issue 3 (eighteenth session): round 15, the persistent form's work-item order (a KV head's head pairs
#                innermost, ORDER 1, against ORDER 0) at 16K and 64K, after its GPU tests
#   gluon-narrow issue 3 (eighteenth session): the narrow sink tile in the persistent Gluon forward (NARROW, REGS 240):
#                its GPU tests, then round 16 on sinks + window and window 1024 at 16K and 64K
#   gluon-fused  issue 3 (nineteenth session, run in the twentieth: right, not faster): the Gluon dk / dv kernel with dq
#                in it (GLUON_BWD FUSED_DQ: TMA reduce-adds into a float32 accumulator, 5 products a pair instead of 7):
#                its GPU tests, then round 17
#   gluon-rows   issue 3 (twentieth session, NOT YET RUN): the Gluon dk / dv kernel's ROWS forms (GLUON_BWD ROWS 1 / 2:
#                S = Q K^T, P and dS through shared memory), alone and fused, and the Gluon dq kernel (GLUON_DQ): their
#                GPU tests (bfloat16), then round 18 at 16K
#   (item-axis: the dk / dv grid's order, run in the twenty-seventh session: no faster, removed with its section)
#   nbhd-bench   issue 3 (twenty-fifth session, run in the twenty-seventh: benchmarks/results/h100-2026-12-07-s27): attnzoo bench on the three N-D neighborhoods of the protocol (16K tokens,
#                forward and forward+backward; triton, flex and the dense baseline) -- on the H100 only flex's baseline
#                had run (2026-11-23); attnzoo's kernels were last timed there on an H200 (ninth session)
#   (dkdv-pipe, rows3: the twenty-third and twenty-fourth sessions', run in the twenty-third and twenty-fifth; PIPE,
#                ROWS 3 and PINGPONG no faster, removed with their sections)
#   dq-persist   issue 3 (twenty-second session, run in the twenty-third): the Gluon dq kernel's persistent form (GLUON_BWD
#                DQ_PERSIST): its GPU tests (several items a program, lse gradient), round 21 (--repeat 3: windows,
#                sinks + window, causal) against the defaults, the backward by kernel on the short windows
#   bwd-delta    issue 3 (twenty-second session, run in it): delta written by the Gluon dq kernel (the default with
#                GLUON_DQ; SEP_DELTA: by its own kernel first): the Gluon dq GPU tests (bfloat16, with an lse gradient,
#                the default path's; TRITON_DKDV: with the Triton dk / dv kernel), round 20 (--repeat 3: windows,
#                sinks + window, causal), the backward by kernel
#   bwd-ncu      issue 3 (twentieth session, run in the twenty-second): Nsight Compute (ncu, Firecracker machines only) on the
#                backward's kernels of the second call, one config a process (NCU_CONFIGS: comma-separated
#                substrings of attn_bwd_profile.py's config names: triton, gluon dk, fused dq, rows s2, rows fused,
#                rows2 s2, rows2 fused),
#                window 4096 at 16K: speed of light, warp stall reasons, pipes, occupancy
#   rows-check   issue 3 (twenty-ninth session, run in the thirtieth: all passed; window 4096 at 64K 1.44x / 1.47x): the
#                Gluon dk / dv kernel's GPU tests after ROWS_PREF's removal (ROWS 2, bf16 cases; split columns; the
#                default's machine code is unchanged at ptxas sm_90), the Gluon forward's reference tests on sinks
#                with NARROW_LAST 2 in the default (owed since the twenty-eighth session, whose GPU runs checked its
#                narrow-tile test and the default path only), then window 4096's forward at 64K through attnzoo bench
#                twice (1.52x flex in the twenty-ninth session, 1.42-1.46x in the four runs before)
#   (half        issue 3, thirtieth session: run, slower, removed with HALF; commit 886714f has both)
#   xpipe-narrow issue 3 (thirtieth session, NOT YET RUN: the device budget ran out): XPIPE_NARROW (XPIPE with the
#                narrow sink tile at each item's end, opt-in) -- its GPU test with XPIPE's and the default path's, then
#                sinks + window sustained (len_scale.py, three rounds) and round 26 (--repeat 3) at 16K. XPIPE itself
#                (plain windows) ran in the thirtieth session and is the local class's default
#                (run in the thirty-first session: faster, XPIPE_NARROW the local default since; its tests ran out of
#                time there, so xpn-default runs them)
#   (xstag       issue 3, thirty-first session's XPIPE_NARROW=2: run in the thirty-second, 7-10 % slower, removed with
#                its section; commit d5b09a7 has both)
#   (qreg        issue 3, thirty-third session: run in it, slower on window 4096 and in the dq kernel, removed with
#                QREG and DQ_QREG; commit 0ff9600 has both)
#   (bwd-cands, bwd-cands-sustained  issue 3, thirty-fourth session's backward candidates: run in the thirty-fifth
#                (benchmarks/results/h100-2026-12-07-s35/c1, c2). T_STATS won (window 4096 dk / dv 6.97 -> 5.79 ms,
#                sustained backward 11.0-11.35 -> 10.25-10.43 ms) and is the default on every class; S_AHEAD and
#                DQ_BN 128 lost and were removed with their sections; commit caacfda has them)
#   tstats-classes issue 3 (thirty-fifth session, run in it, c3): the sustained backward with T_STATS on causal, window
#                1024 and sinks + window against the defaults of then and "wide pp", then attnzoo bench at 16K
#   tstats-default issue 3 (thirty-fifth session, run in it, c4): triton_bwd_check.py's correctness cases at real sizes
#                with T_STATS the default everywhere, the backward by kernel on window 4096 (T_STATS with a ring of 2 /
#                3 / 4, ROWS 2 as before), attnzoo bench fwd+bwd at 16K (windows, sinks + window, causal)
#   tail         issue 3 (thirty-fifth session, not yet run): TAIL_ORDER, the Gluon dk / dv kernel on a 1-D grid whose
#                last (shortest) items run with the (batch, KV head)s fastest. The 2-D grid (items, B * HKV) runs each KV
#                head's items longest first, so window 4096's 32 shorter columns of the last KV heads fill the last wave
#                alone: a greedy schedule over 132 SMs ends 4.5 % after the mean SM's work at 16K, 59 % at 4K (causal:
#                1.3 % / 59 %); with the tail's heads fastest 0.0 % / 0.0 % (benchmarks/dkdv_waves.py). With SPLIT_CAP 9 too
#                (window 1024's 17-18-block columns in two work items, float32 partials summed after): window 1024
#                6.4 % -> 2.1 %, sinks + window 8.7 % -> 2.2 % in that model, which leaves out the partials' cost. Its GPU
#                tests, the backward by kernel at 16K and 4K (window 4096, causal, window 1024, sinks + window),
#                sustained at 16K (2 rounds)
#   tail-all     issue 3 (thirty-sixth session): tail's GPU tests and the backward by kernel at 16K, then attnzoo bench
#                fwd+bwd at 16K vs flex (default timing) in one process: the default, and as --variant triton[tail]
#                ({"bwd": {"GLUON_BWD": {"TAIL_ORDER": true}}}) and triton[tailcap9] (SPLIT_CAP 9 too), each timed right
#                after the default on the same pattern (thirty-seventh session). TAIL_K (the tests' -k), TAIL_PATTERNS
#                and TAIL_LENS (the profile's; also section tail's) narrow it
#   mem-ncu      issue 3 (thirty-third session): Nsight Compute's memory sections (shared-memory wavefronts, L1 and L2
#                throughput) and the tensor pipe on window 4096's default backward kernels (dk / dv and dq, 16K) and its
#                forward: what bounds the dk / dv kernel at 63 % of the tensor pipe
#   fold         issue 3 (thirty-second session; run in it: faster, the local default since): XPIPE_NARROW="fold" (the sinks loaded into an unseen
#                16-key slot of each flagged item's first partial block, no narrow tile or step; opt-in) -- its GPU
#                tests (test_gluon_xpipe_narrow[fold], the reference tests on 8 patterns), round 26 on sinks + window
#                against the default (XPIPE_NARROW=True), three sustained rounds at 16K and 64K
#   wide-xpipe   issue 3 (thirty-first session; run in the thirty-second: no difference, 14.6 ms both at 64K): window 4096 with XPIPE against the wide default, four sustained rounds at
#                16K and 64K (round 26's passes spread 5-10 %, more than the difference; XPIPE would then be the one
#                boundary form of the local and wide classes)
#   xpn-default  issue 3 (thirty-first session; ran there, c2: its last test hung on QBUF=1, fixed, rerun in c3): the Gluon forward's XPIPE / XPIPE_NARROW tests and the default path
#                with XPIPE_NARROW in the local default (sinks + window through attention(), forward and backward)
#   last2-check  issue 3 (twenty-eighth session; in the twenty-ninth only its bench ran, the tests moved to
#                rows-check): the Gluon forward's reference tests with NARROW_LAST 2 (the local / wide default since
#                then) and the default path, then attnzoo bench on sinks + window and window 1024 at 64K (forward,
#                default timing; round 16 had 4.835 -> 4.621 ms)
#   dq-pipe      issue 3 (twenty-eighth session, run in the twenty-ninth: DQ_PIPE + DQ_PREF the default since): the
#                persistent Gluon dq kernel with DQ_PIPE (each step's dq MMA issued behind the next step's S and dP) and
#                DQ_PREF (each item's O and lse loaded during the item before): their GPU tests, the backward by kernel
#                at 16K (window 1024 / 4096, sinks + window) with and without them, and sustained (len_scale.py)
#   len-scale    issue 3 (twenty-eighth session): the forward and backward by kernel at 16K and 64K (window 1024 /
#                4096, sinks + window; attn_bwd_profile.py --fwd --configs default) with the SM clock and power sampled
#                (nvidia-smi, 200 ms): window 1024's backward took 7.5 % more per visible pair at 64K than at 16K in
#                the twenty-seventh session's attnzoo bench, and window 4096's forward 9 % more
#   bwd-profile  issue 3 (nineteenth session): benchmarks/attn_bwd_profile.py, the backward's device time by kernel (dq,
#                dk / dv, Triton and Gluon) with each kernel's effective TF/s, 16K, windows and causal
#   sinks-bench  issue 3: attnzoo bench on window 1024 and sinks + window alone (16K fwd+bwd, 64K fwd; triton, flex)
#   gluon-bwd    issue 3 (eighteenth session, NOT YET RUN): the Gluon dk / dv kernel (cfg GLUON_BWD): its GPU tests,
#                then round 17 against the Triton backward at 16K (four local patterns)
#   wide64       issue 3: round 15 on window 4096 at 64K without --quick (1.42x flex through attnzoo bench; ORDER 0 vs
#                1 was 13.71 vs 16.33 ms in the quick run, noise or not)
#   gluon-default issue 3 (seventeenth session): the Gluon GPU tests with the dense / wide classes' new default (the
#                warp-specialised Gluon forward on 64 x 128 tiles); run `windows` after it for attnzoo bench
#   bwd-w8       issue 3 (sixteenth session): the dk/dv kernel at 8 warps on the default 64 x 64 tiles, with KT (no
#                spills, ptxas sm_90), 1 / 3 stages, MERGE, and both kernels at 8 warps (triton_pack_variants.py
#                --round 9), 16K, after the default forward, vs flex (~4 min)
#   narrow       issue 3 (fifteenth session): NARROW, block 0 as a 16- / 32-key tile on the query blocks that see only
#                the sinks in it, on sinks + window 1024 (and window 1024, where it must change nothing) at 16K, then
#                sinks + window at 64K, against flex in the same run (triton_pack_variants.py --round 8, ~4 min)
#   kda-final    issue 5: kda-rows in short (a device budget of five minutes): GDN / KDA / SDPA at 2x8192 and 4x8192
#                first, then the GPU checks
#   linear-check issue 5: the GPU correctness checks alone (simple GLA, the step kernels, GDN, KDA, GLA and the
#                config variants of GLA and KDA)
#   niah         issue 4: the needle grid on the GPU (trained at 1K, tested to 8K)
#   recall       issue 4: the MQAR window cell at lr 1e-3 and BASED
#   decode-wide  issue 6: MLA decode through the wide-head Triton decode kernel
#   merge        issue 3: the full and partial blocks in one loop (MERGE) on windows, sinks and causal, forward
#   linear-b1b   issue 5: state tiles of GDN / KDA / simple GLA at B=1, checks, every op vs SDPA at B=1 T=8K
#   linear-b1c   issue 5: every op vs SDPA at B=1, T=8K and 16K (run with fla off the path: no autotuning)
#   gla-inter    issue 5: GLA's inter-chunk backward per Dk block with dv apart (inter="split"), B=8 T=2048
#   merge-bwd    issue 3: MERGE in the backward kernels (dq and dk/dv), with the forward variants again
#   linear-b1    issue 5: GLA's state-kernel variants (with their GPU check) and every op vs SDPA at B=1, T=8K
# On demand: smoke (the fused layout kernels, band and routed, against the PyTorch layouts and a windowed /
#   routed fwd+bwd against float64 on the GPU, < 1 min: the check after any change to the layout kernels).
# Measured already, kept to reproduce: pack4 (issue 3: round 4, TMA and warp specialisation), nbhd / nbhd-bwd
#   (issue 3: forward / backward tiles on the N-D neighborhoods), gla-diag (issue 5: GLA's / KDA's broadcast
#   diagonal: slower everywhere, stays opt-in), host (issue 3: host time of a small call, layer by layer, cProfile),
#   small (issue 3: the small-batch Triton path), pack / pack2 / pack3 (issue 3: rounds 1-3 of the forward
#   variants: GQA head packing, folded scale, backward tiles, block-index modes, D=64), check (issue 3:
#   correctness at real sizes with the current defaults), layout (issue 3: the fused layout kernel vs the
#   PyTorch layout, as shares of the forward at 16K/64K), windows (issue 3: the local patterns through
#   `attnzoo bench`, 16K fwd+bwd and 64K fwd), routing (issue 7: routed sparse vs dense SDPA at 32K-128K),
#   linear (issue 5: every op vs flash-linear-attention, scaling, decode GB/s; fla's autotuner spends 35-180 s
#   per op on its first call), linear-dk (issue 5: Gated DeltaNet and KDA vs fla), linear-sweep (issue 5:
#   config variants with their accuracy), flash (issue 4: the FlashAttention grid), grid64 (issue 4: 64K
#   forward+backward of the long-context grid).
# flash-linear-attention travels as a wheel (fla_core), see the device tool's README. Only linear-fla, linear-gla,
# linear, linear-dk (and linear-decode, for fla's rows) want it on PYTHONPATH; run every other linear section in a call without it (with fla
# importable, the speed table times fla's version of each op too, and its autotuner takes minutes per op).
set -u
OUT=${1:?usage: gpu_pending.sh OUT_DIR [SECTION ...]}; shift
# after the thirty-sixth and thirty-seventh sessions (2026-12-08, no device machine): tail-all (about 450 s; its bench
# part in one process with --variant), then tail's sustained rounds
# for the winner, then mem-ncu on the backward default (T_STATS)
SECTIONS=${*:-tail-all}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src PYTHONUNBUFFERED=1
mkdir -p "$OUT"
# Triton's cache in the repo: fla autotunes with cache_results=True, so its choices land here as *.autotune.json;
# they are packed into $OUT/triton_autotune.tgz at the end. Unpacked into .triton_cache/ and carried to the next
# run (carry [".whl", ".triton_cache"]), fla's first calls load them instead of autotuning for minutes.
# AUTOTUNE_TGZ: such a pack committed with an earlier run's results (it travels with the working tree, no carry
# needed), unpacked here first; fla's autotuner then finds its choices for the same kernels and shapes. For smoke runs
# only: on 2026-12-05 fla's Gated DeltaNet took 2.708 ms fwd+bwd with the seventh session's picks, 2.075 autotuned
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton_cache}
mkdir -p "$TRITON_CACHE_DIR"
if [ -n "${AUTOTUNE_TGZ:-}" ]; then
  tar xzf "$AUTOTUNE_TGZ" -C "$TRITON_CACHE_DIR" && echo "autotune choices unpacked from $AUTOTUNE_TGZ"
fi
# tail / tail-all: TAIL_ORDER's and SPLIT_CAP's GPU tests, then the backward by kernel at each of the lengths given
# (args: the tests' default timeout, the default lengths)
tail_tests_profile() {
  timeout ${GLUON_TEST_S:-$1} python3 -m pytest -q -p no:cacheprovider -o addopts="" -rfE \
    tests/backends/test_gluon_bwd.py -k "${TAIL_K:-tail and (split or dtype0)}" > "$OUT/tail_tests.txt" 2>&1
  tail -3 "$OUT/tail_tests.txt"
  for L in ${TAIL_LENS:-$2}; do
    timeout ${PROFILE_S:-150} python3 benchmarks/attn_bwd_profile.py --L $L \
      --patterns ${TAIL_PATTERNS:-sw4096,causal,sw1024,sinks+sw1024} \
      --configs "default,t stats tail,t stats tail cap9" >> "$OUT/tail_profile.txt" 2>&1
  done
}
for s in $SECTIONS; do
  echo "== $s"
  case $s in
    host) timeout 90 python3 benchmarks/host_overhead.py --profile --out "$OUT/host.jsonl" > "$OUT/host_log.txt" 2>&1 ;;
    small) timeout 90 python3 benchmarks/triton_small_batch_profile.py > "$OUT/small_batch.txt" 2>&1 ;;
    linear) timeout ${LINEAR_S:-240} python3 benchmarks/linear_bench.py --out "$OUT" --quick --check quick --no-torch > "$OUT/linear_log.txt" 2>&1 ;;
    linear-dk) timeout ${LINEAR_S:-400} python3 benchmarks/linear_bench.py --out "$OUT" --quick --check none --no-torch \
              --no-decode --ops gdn,kda,sdpa --shapes 8x2048 > "$OUT/linear_dk_log.txt" 2>&1 ;;
    gla-diag) timeout ${LINEAR_S:-200} python3 benchmarks/linear_bench.py --out "$OUT" --check none --no-decode --no-torch \
              --sweep-ops gla,kda --sweep-only bcast --ops sdpa --shapes 8x2048 > "$OUT/gla_diag_log.txt" 2>&1 ;;
    linear-gla) timeout ${LINEAR_S:-330} python3 benchmarks/linear_bench.py --out "$OUT" --quick --check none --no-torch \
              --no-decode --ops gla,sdpa --shapes 8x2048 --profile-ops gla > "$OUT/linear_gla_log.txt" 2>&1 ;;
    linear-fla) timeout ${LINEAR_S:-420} python3 benchmarks/linear_bench.py --out "$OUT" --quick --check none --no-torch \
              --no-decode --fla-unguarded --ops simple_gla,gdn,sdpa --shapes 8x2048 > "$OUT/linear_fla_log.txt" 2>&1 ;;
    linear-sdpa) timeout ${LINEAR_S:-200} python3 benchmarks/linear_bench.py --out "$OUT/sdpa" --check none --no-decode --no-torch \
              --profile-ops kda,gdn --profile-shape 2x8192 --ops simple_gla,gla,gdn,kda,sdpa \
              --shapes 2x8192,1x16384,4x8192,1x8192,8x2048 > "$OUT/linear_sdpa_log.txt" 2>&1 ;;
    kda-ib) timeout ${LINEAR_S:-150} python3 benchmarks/linear_bench.py --out "$OUT" --check quick --no-decode --no-torch \
              --sweep-ops kda --sweep-only ib --ops sdpa --shapes 8x2048 > "$OUT/kda_ib_log.txt" 2>&1
            timeout ${LINEAR_S:-150} python3 benchmarks/linear_bench.py --out "$OUT" --check none --no-decode --no-torch \
              --sweep-ops kda --sweep-only ib --sweep-shape 2x8192 --ops sdpa --shapes 2x8192 >> "$OUT/kda_ib_log.txt" 2>&1 ;;
    kda-pre) timeout ${LINEAR_S:-150} python3 benchmarks/linear_bench.py --out "$OUT" --check quick --no-decode --no-torch \
              --sweep-ops kda --sweep-only pre --sweep-shape 2x8192 --ops sdpa --shapes 2x8192 > "$OUT/kda_pre_log.txt" 2>&1
            timeout ${LINEAR_S:-150} python3 benchmarks/linear_bench.py --out "$OUT/b1" --check none --no-decode --no-torch \
              --sweep-ops kda --sweep-only pre --sweep-shape 1x8192 --ops simple_gla,gla,gdn,kda,sdpa \
              --shapes 1x8192,2x8192 >> "$OUT/kda_pre_log.txt" 2>&1 ;;
    linear-scale) timeout ${LINEAR_S:-150} python3 benchmarks/linear_bench.py --out "$OUT/scale" --check none --no-decode \
              --no-torch --ops simple_gla,gla,gdn,kda,sdpa --shapes 1x8192,1x65536 > "$OUT/linear_scale_log.txt" 2>&1 ;;
    gla-fwd) timeout ${LINEAR_S:-150} python3 benchmarks/linear_bench.py --out "$OUT" --check quick --no-decode --no-torch \
              --sweep-ops gla --sweep-only scores --ops sdpa --shapes 8x2048 > "$OUT/gla_fwd_log.txt" 2>&1
            timeout ${LINEAR_S:-100} python3 benchmarks/linear_bench.py --out "$OUT" --check none --no-decode --no-torch \
              --sweep-ops gla --sweep-only scores --sweep-shape 2x8192 --ops sdpa --shapes 2x8192 >> "$OUT/gla_fwd_log.txt" 2>&1 ;;
    delta-bwd) timeout ${LINEAR_S:-200} python3 benchmarks/linear_bench.py --out "$OUT/dbwd" --check none --no-decode --no-torch \
              --sweep-ops gdn,kda --sweep-only b16w,b32w,b64w,main-split,p64w8,p32w8,inv-dbl --sweep-shape 2x8192 --ops sdpa --shapes 2x8192 > "$OUT/delta_bwd_log.txt" 2>&1 ;;
    linear-decode) timeout ${LINEAR_S:-120} python3 benchmarks/linear_bench.py --out "$OUT/decode" --check none --quick \
              --no-torch --ops sdpa --shapes 1x1024 > "$OUT/linear_decode_log.txt" 2>&1 ;;
    linear-packed) timeout ${LINEAR_S:-120} python3 benchmarks/linear_bench.py --out "$OUT/packed" --check none --no-decode \
              --no-torch --packed --packed-sets ${PACKED_SETS:-64x64-512,128x128-2048,512x16-128} --ops sdpa --shapes 1x1024 \
              > "$OUT/linear_packed_log.txt" 2>&1 ;;
    gdn-fla) timeout ${LINEAR_S:-420} python3 benchmarks/linear_bench.py --out "$OUT/gdnfla" --quick --check none --no-torch \
              --no-decode --sweep-ops gdn --sweep-only ${GDN_ONLY:-h32w8,h64w8,h32w4,main-split,p64w8,inv-dbl,prep-split,b32w8} \
              --gdn-variants ${GDN_VARIANTS:-prep-split-dbl,main-split-k64v32b32w88,h32w8,prep-split-dbl+main-split-k64v32b32w88+h32w8,inv-dbl-w4+main-split-k64v32b32w88+h32w8} \
              --fla-unguarded --ops gdn,sdpa --shapes 8x2048 > "$OUT/gdn_fla_log.txt" 2>&1 ;;
    gdn-sweep) timeout ${LINEAR_S:-240} python3 benchmarks/linear_bench.py --out "$OUT/gdn" --check none --no-decode --no-torch \
              --profile-ops gdn --profile-shape 8x2048 --sweep-ops gdn --sweep-only ${GDN_ONLY:-h32w8,h64w8,h32w4,main-split,p64w8,inv-dbl,prep-split,b32w8} --ops sdpa \
              --shapes 8x2048 > "$OUT/gdn_sweep_log.txt" 2>&1 ;;
    fwd-lazy) timeout ${PACK_S:-300} python3 benchmarks/triton_pack_variants.py --round 7 \
              --patterns ${LAZY_PATTERNS:-causal,sw1024,sw4096,sinks+sw1024} --out "$OUT" --quick > "$OUT/fwd_lazy_log.txt" 2>&1 ;;
    gluon-ws) timeout ${GLUON_TEST_S:-200} python3 -m pytest -q -p no:cacheprovider tests/backends/test_gluon_fwd.py \
              > "$OUT/gluon_ws_log.txt" 2>&1
           timeout ${PACK_S:-240} python3 benchmarks/triton_pack_variants.py --round 12 \
              --patterns ${GLUON_PATTERNS:-sw1024,sinks+sw1024,sw4096,causal} --out "$OUT/gluonws" --quick >> "$OUT/gluon_ws_log.txt" 2>&1
           timeout ${GLUON64_S:-100} python3 benchmarks/triton_pack_variants.py --round 12 --patterns sw1024,sinks+sw1024 \
              --L 65536 --out "$OUT/gluonws_64k" --quick >> "$OUT/gluon_ws_log.txt" 2>&1 ;;
    gluon-ws128) timeout ${GLUON_TEST_S:-120} python3 -m pytest -q -p no:cacheprovider tests/backends/test_gluon_fwd.py -k "128-128" \
              > "$OUT/gluon_ws128_log.txt" 2>&1
           timeout ${PACK_S:-200} python3 benchmarks/triton_pack_variants.py --round 13 \
              --patterns ${GLUON_PATTERNS:-sw1024,sw4096,causal} --out "$OUT/gluonws128" --quick >> "$OUT/gluon_ws128_log.txt" 2>&1 ;;
    gluon-wsp) timeout ${GLUON_TEST_S:-120} python3 -m pytest -q -p no:cacheprovider tests/backends/test_gluon_fwd.py -k "wsp or persistent" \
              > "$OUT/gluon_wsp_log.txt" 2>&1
           timeout ${PACK_S:-220} python3 benchmarks/triton_pack_variants.py --round 14 \
              --patterns ${GLUON_PATTERNS:-sw1024,sinks+sw1024,sw4096,causal} --out "$OUT/gluonwsp" --quick >> "$OUT/gluon_wsp_log.txt" 2>&1
           timeout ${GLUON64_S:-90} python3 benchmarks/triton_pack_variants.py --round 14 --patterns sw1024 \
              --L 65536 --out "$OUT/gluonwsp_64k" --quick >> "$OUT/gluon_wsp_log.txt" 2>&1 ;;
    gluon-order) timeout ${GLUON_TEST_S:-120} python3 -m pytest -q -p no:cacheprovider tests/backends/test_gluon_fwd.py -k "persistent" \
              > "$OUT/gluon_order_log.txt" 2>&1
           timeout ${PACK_S:-220} python3 benchmarks/triton_pack_variants.py --round 15 \
              --patterns ${GLUON_PATTERNS:-sw1024,sinks+sw1024,sw4096,causal} --out "$OUT/gluonorder" --quick >> "$OUT/gluon_order_log.txt" 2>&1
           timeout ${GLUON64_S:-200} python3 benchmarks/triton_pack_variants.py --round 15 --patterns sw1024,sinks+sw1024,sw4096 \
              --L 65536 --out "$OUT/gluonorder_64k" --quick >> "$OUT/gluon_order_log.txt" 2>&1 ;;
    gluon-narrow) timeout ${GLUON_TEST_S:-150} python3 -m pytest -q -p no:cacheprovider tests/backends/test_gluon_fwd.py \
              -k "narrow or persistent or cross or falls or NARROW" > "$OUT/gluon_narrow_log.txt" 2>&1
           timeout ${PACK_S:-150} python3 benchmarks/triton_pack_variants.py --round 16 --patterns sinks+sw1024,sw1024 \
              --out "$OUT/gluonnarrow" --quick --repeat 3 >> "$OUT/gluon_narrow_log.txt" 2>&1
           timeout ${GLUON64_S:-150} python3 benchmarks/triton_pack_variants.py --round 16 --patterns sinks+sw1024 \
              --L 65536 --out "$OUT/gluonnarrow_64k" --quick --repeat 3 >> "$OUT/gluon_narrow_log.txt" 2>&1 ;;
    sinks-bench) for dir in both fwd; do  # attnzoo bench on sinks + window (and window 1024): 16K fwd and fwd+bwd, 64K fwd
               lens=16384; [ $dir = fwd ] && lens=65536
               timeout ${WINDOWS_S:-150} python3 -m attnzoo.cli bench run --suite cuda --out "$OUT/sinks" --no-report \
                 --lengths $lens --direction $dir --backend triton --backend flex --backend sdpa-cudnn --pattern sw1024 --pattern sinks+sw1024 \
                 --max-time-s 1.0 >> "$OUT/sinks_log.txt" 2>&1
             done ;;
    gluon-bwd) timeout ${GLUON_TEST_S:-300} python3 -m pytest -q -x -p no:cacheprovider tests/backends/test_gluon_bwd.py \
              > "$OUT/gluon_bwd_log.txt" 2>&1
           timeout ${PACK_S:-300} python3 benchmarks/triton_pack_variants.py --round 17 \
              --patterns ${BWD_PATTERNS:-sw1024,sinks+sw1024,sw4096,causal} --out "$OUT/gluonbwd" --quick >> "$OUT/gluon_bwd_log.txt" 2>&1 ;;
    gluon-fused) timeout ${GLUON_TEST_S:-150} python3 -m pytest -q -x -p no:cacheprovider tests/backends/test_gluon_bwd.py \
              -k "matches_reference and fused" > "$OUT/gluon_fused_log.txt" 2>&1
           timeout ${PACK_S:-200} python3 benchmarks/triton_pack_variants.py --round 17 \
              --patterns ${BWD_PATTERNS:-sw1024,sw4096,causal} --out "$OUT/gluonfused" --quick >> "$OUT/gluon_fused_log.txt" 2>&1 ;;
    gluon-rows) timeout ${GLUON_TEST_S:-240} python3 -m pytest -q -p no:cacheprovider tests/backends/test_gluon_bwd.py \
              -o addopts="" -rfE -k "matches_reference and (rows or gdq) and ${ROWS_DTYPES:-dtype0}" \
              > "$OUT/gluon_rows_log.txt" 2>&1  # (bfloat16 first: ROWS_DTYPES="(dtype0 or dtype1)" for both)
           timeout ${PACK_S:-280} python3 benchmarks/triton_pack_variants.py --round 18 \
              --patterns ${BWD_PATTERNS:-sw1024,sw4096} --out "$OUT/gluonrows" --quick >> "$OUT/gluon_rows_log.txt" 2>&1 ;;
    bwd-default) timeout ${GLUON_TEST_S:-150} python3 -m pytest -q -p no:cacheprovider -o addopts="" -rfE \
              tests/backends/test_gluon_fwd.py tests/backends/test_gluon_bwd.py \
              -k "default_forward_runs_gluon or split_columns" > "$OUT/bwd_default_log.txt" 2>&1
           # (the backward's default on windows: the Gluon dk / dv kernel, ROWS 2, and the Gluon dq kernel)
           timeout ${WINDOWS_S:-220} python3 -m attnzoo.cli bench run --suite cuda --out "$OUT/bwddefault" --no-report \
              --lengths 16384 --direction fwdbwd --backend triton --backend flex --backend sdpa-cudnn --pattern sw1024 \
              --pattern sw4096 --pattern sinks+sw1024 --max-time-s 1.0 >> "$OUT/bwd_default_log.txt" 2>&1 ;;
    bwd-delta) timeout ${GLUON_TEST_S:-200} python3 -m pytest -q -p no:cacheprovider -o addopts="" -rfE \
              tests/backends/test_gluon_fwd.py tests/backends/test_gluon_bwd.py \
              -k "default_forward_runs_gluon or lse_gradient or (matches_reference and gdq and dtype0)" \
              > "$OUT/bwd_delta_log.txt" 2>&1
           timeout ${PACK_S:-260} python3 benchmarks/triton_pack_variants.py --round 20 --repeat ${REPEAT:-3} \
              --patterns ${BWD_PATTERNS:-sw1024,sinks+sw1024,sw4096,causal} --out "$OUT/bwddelta" --quick \
              >> "$OUT/bwd_delta_log.txt" 2>&1
           timeout ${PROFILE_S:-100} python3 benchmarks/attn_bwd_profile.py --patterns sw1024,sinks+sw1024,causal \
              --configs "triton,gluon dq s3 + rows2 s3,gluon dq s3 + triton" >> "$OUT/bwd_delta_log.txt" 2>&1 ;;
    nbhd-bench) timeout ${NBHD_S:-420} python3 -m attnzoo.cli bench run --suite cuda --out "$OUT/nbhd" --no-report \
              --lengths 16384 --direction both --backend triton --backend flex --pattern nbhd2d-13x13 \
              --pattern nbhd2d-31x31 --pattern nbhd3d-5x7x7 --max-time-s 1.0 > "$OUT/nbhd_log.txt" 2>&1 ;;
    dq-persist) timeout ${GLUON_TEST_S:-200} python3 -m pytest -q -p no:cacheprovider -o addopts="" -rfE \
              tests/backends/test_gluon_fwd.py tests/backends/test_gluon_bwd.py \
              -k "persistent_walks or (matches_reference and gdqp and dtype0) or default_forward_runs_gluon" \
              > "$OUT/dq_persist_log.txt" 2>&1
           timeout ${PACK_S:-290} python3 benchmarks/triton_pack_variants.py --round 21 --repeat ${REPEAT:-3} \
              --patterns ${BWD_PATTERNS:-sw1024,sinks+sw1024,sw4096,causal} --out "$OUT/dqpersist" --quick \
              >> "$OUT/dq_persist_log.txt" 2>&1
           timeout ${PROFILE_S:-80} python3 benchmarks/attn_bwd_profile.py --patterns sw1024,sinks+sw1024 \
              --configs "triton,gluon dq s3 + triton,gluon dqp" >> "$OUT/dq_persist_log.txt" 2>&1 ;;
    bwd-confirm) timeout ${PACK_S:-240} python3 benchmarks/triton_pack_variants.py --round 19 --repeat ${REPEAT:-3} \
              --patterns ${BWD_PATTERNS:-sw1024,sw4096} --out "$OUT/bwdconfirm" --quick > "$OUT/bwd_confirm_log.txt" 2>&1 ;;
    bwd-ncu) IFS=, read -ra ncu_cfgs <<< "${NCU_CONFIGS:-triton,gluon dq s3 + rows2 s3,gluon rows fused s2}"
             for c in "${ncu_cfgs[@]}"; do  # Nsight Compute on the backward's kernels, one config a process
               # (the second call's: a config launches dq, dk / dv twice, or the fused dk / dv twice; skip the first)
               timeout ${NCU_S:-150} ncu --clock-control none --kernel-name regex:"attn_bwd_dkdv|attn_bwd_dq" \
                 --launch-skip 1 --launch-count 3 --section SpeedOfLight --section WarpStateStats \
                 --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats \
                 python3 benchmarks/attn_bwd_profile.py --plain --patterns ${NCU_PATTERN:-sw4096} --configs "$c" \
                 >> "$OUT/bwd_ncu_log.txt" 2>&1
             done ;;
    rows-check) timeout ${GLUON_TEST_S:-200} python3 -m pytest -q -p no:cacheprovider -o addopts="" -rfE \
                  tests/backends/test_gluon_bwd.py -k "(rows2 and dtype0) or split_columns" > "$OUT/rows_tests.txt" 2>&1
                timeout ${GLUON_TEST_S:-200} python3 -m pytest -q -p no:cacheprovider -o addopts="" -rfE \
                  tests/backends/test_gluon_fwd.py -k "matches_reference and sinks" > "$OUT/last2_tests.txt" 2>&1
                for i in 1 2; do
                  timeout ${WINDOWS_S:-100} python3 -m attnzoo.cli bench run --suite cuda --out "$OUT/sw4096_64k_$i" \
                    --no-report --no-baseline --lengths 65536 --direction fwd --backend triton --backend flex \
                    --pattern sw4096 --max-time-s 1.0 > "$OUT/sw4096_64k_${i}_log.txt" 2>&1
                done ;;
    fold) timeout ${GLUON_TEST_S:-150} python3 -m pytest -q -p no:cacheprovider -o addopts="" -rfE \
             tests/backends/test_gluon_fwd.py -k "(xpipe_narrow and fold) or (matches_reference and extra13)" \
             > "$OUT/fold_tests.txt" 2>&1
           tail -3 "$OUT/fold_tests.txt"
           timeout ${WINDOWS_S:-150} python3 benchmarks/triton_pack_variants.py --round 26 --repeat 3 \
             --patterns sinks+sw1024 --only "wsp default,xpipe narrow,xpipe fold" --out "$OUT/r26" > "$OUT/r26_16384.txt" 2>&1
           timeout ${PROFILE_S:-200} python3 benchmarks/len_scale.py --patterns sinks+sw1024 --shapes 1x16384,1x65536 \
             --configs "default,xpipe fold" --rounds 3 > "$OUT/fold_sustained.txt" 2>&1 ;;
    tail) tail_tests_profile 200 "16384 4096"
          timeout ${SUSTAIN_S:-200} python3 benchmarks/len_scale.py --bwd --patterns sw4096,causal,sw1024,sinks+sw1024 \
            --shapes 1x16384 --configs "default,tstats tail,tstats tail cap9" --rounds 2 > "$OUT/tail_sustained.txt" 2>&1 ;;
    tail-all) tail_tests_profile 130 16384
              # fwd+bwd vs flex (default timing) in one process: the default, then TAIL_ORDER, then TAIL_ORDER with
              # SPLIT_CAP 9, merged over every class's backward config, each right after the default (--variant)
              timeout ${WINDOWS_S:-200} python3 -m attnzoo.cli bench run --suite cuda --out "$OUT/bench_tail" \
                --no-report --no-baseline --lengths 16384 --direction fwd+bwd --backend triton --backend flex \
                --pattern sw4096 --pattern sw1024 --pattern sinks+sw1024 --max-time-s 1.0 \
                --variant 'tail={"bwd": {"GLUON_BWD": {"TAIL_ORDER": true}}}' \
                --variant 'tailcap9={"bwd": {"GLUON_BWD": {"TAIL_ORDER": true, "SPLIT_CAP": 9}}}' \
                > "$OUT/bench_tail_log.txt" 2>&1
              python3 -m attnzoo.cli bench report --out "$OUT/bench_tail" > /dev/null 2>&1
              grep -A8 "vs compiled FlexAttention" "$OUT/bench_tail/report.md" ;;
    tstats-classes) timeout ${SUSTAIN_S:-200} python3 benchmarks/len_scale.py --bwd --patterns causal,sw1024,sinks+sw1024 \
                 --shapes 1x16384 --configs "default,wide tstats,wide pp" --rounds 2 > "$OUT/tstats_classes.txt" 2>&1
               timeout ${WINDOWS_S:-200} python3 -m attnzoo.cli bench run --suite cuda --out "$OUT/windows" --no-report \
                 --lengths 16384 --direction both --backend triton --backend flex --backend sdpa-cudnn --pattern sw4096 \
                 --pattern sw1024 --max-time-s 1.0 > "$OUT/windows_log.txt" 2>&1 ;;
    tstats-default) timeout ${CHECK_S:-200} python3 benchmarks/triton_bwd_check.py --out "$OUT" --lengths "" \
                 > "$OUT/check_log.txt" 2>&1
               tail -14 "$OUT/check_log.txt"
               timeout ${PROFILE_S:-100} python3 benchmarks/attn_bwd_profile.py --patterns sw4096 \
                 --configs "default,t stats s,rows2" > "$OUT/tstats_profile.txt" 2>&1
               timeout ${WINDOWS_S:-200} python3 -m attnzoo.cli bench run --suite cuda --out "$OUT/windows" --no-report \
                 --lengths 16384 --direction fwd+bwd --backend triton --backend flex --pattern sw4096 --pattern sw1024 \
                 --pattern sinks+sw1024 --pattern causal --max-time-s 1.0 > "$OUT/windows_log.txt" 2>&1 ;;
    mem-ncu) S="--section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables"
             S="$S --section ComputeWorkloadAnalysis --section WarpStateStats"
             timeout ${NCU_S:-200} ncu --clock-control none --kernel-name regex:"attn_bwd_dkdv|attn_bwd_dq" \
               --launch-skip 1 --launch-count 2 $S python3 benchmarks/attn_bwd_profile.py --plain --patterns sw4096 \
               --configs default > "$OUT/bwd_mem_ncu.txt" 2>&1
             timeout ${NCU_S:-150} ncu --clock-control none --kernel-name regex:gluon_attn_fwd --launch-skip 1 \
               --launch-count 1 $S python3 benchmarks/attn_bwd_profile.py --plain --fwd --configs none --patterns sw4096 \
               > "$OUT/fwd_mem_ncu.txt" 2>&1 ;;
    wide-xpipe) timeout ${PROFILE_S:-200} python3 benchmarks/len_scale.py --patterns sw4096 --shapes 1x16384,1x65536 \
                  --configs "default,xpipe" --rounds 4 > "$OUT/wide_xpipe_sustained.txt" 2>&1 ;;
    xpn-default) timeout ${GLUON_TEST_S:-330} python3 -m pytest -q -p no:cacheprovider -o addopts="" -rfE \
                   tests/backends/test_gluon_fwd.py -k "xpipe or default_forward" > "$OUT/xpn_tests.txt" 2>&1
                 tail -3 "$OUT/xpn_tests.txt" ;;
    xpipe-narrow) timeout ${GLUON_TEST_S:-150} python3 -m pytest -q -p no:cacheprovider -o addopts="" -rfE \
                    tests/backends/test_gluon_fwd.py -k "xpipe or default_forward" > "$OUT/xpipe_tests.txt" 2>&1
                  timeout ${PROFILE_S:-120} python3 benchmarks/len_scale.py --patterns sinks+sw1024 --shapes 1x16384 \
                    --configs "default,xpipe narrow" --rounds 3 > "$OUT/xpipe_narrow_sustained.txt" 2>&1
                  timeout ${WINDOWS_S:-150} python3 benchmarks/triton_pack_variants.py --round 26 --repeat 3 \
                    --patterns sinks+sw1024 --out "$OUT/r26" > "$OUT/r26_16384.txt" 2>&1 ;;
    last2-check) timeout ${GLUON_TEST_S:-200} python3 -m pytest -q -p no:cacheprovider -o addopts="" -rfE \
                   tests/backends/test_gluon_fwd.py -k "(matches_reference and sinks) or default_forward or narrow" \
                   > "$OUT/last2_tests.txt" 2>&1
                 timeout ${WINDOWS_S:-150} python3 -m attnzoo.cli bench run --suite cuda --out "$OUT/last2" --no-report \
                   --lengths 65536 --direction fwd --backend triton --backend flex --pattern sinks+sw1024 \
                   --pattern sw1024 --max-time-s 1.0 > "$OUT/last2_log.txt" 2>&1 ;;
    dq-pipe) timeout ${GLUON_TEST_S:-200} python3 -m pytest -q -p no:cacheprovider -o addopts="" -rfE \
               tests/backends/test_gluon_bwd.py -k "pipe or pref" > "$OUT/dq_pipe_tests.txt" 2>&1
             timeout ${PROFILE_S:-150} python3 benchmarks/attn_bwd_profile.py --patterns sw1024,sw4096,sinks+sw1024 \
               --configs "default,pipe,pref" > "$OUT/dq_pipe_profile.txt" 2>&1
             timeout ${PROFILE_S:-200} python3 benchmarks/len_scale.py --bwd --patterns sw4096,sw1024 --shapes 1x16384 \
               --configs "wide default,wide pipe,wide pref,wide pp,local default,local pipe,local pp" \
               --rounds 3 > "$OUT/dq_pipe_sustained.txt" 2>&1 ;;
    len-scale) (nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv -lms 200 \
                 > "$OUT/smi.csv" 2>&1 &
               smi=$!
               for L in ${SCALE_LENS:-16384 65536}; do
                 timeout ${PROFILE_S:-200} python3 benchmarks/attn_bwd_profile.py --fwd --configs default \
                   --patterns ${SCALE_PATTERNS:-sw1024,sw4096,sinks+sw1024} --L $L >> "$OUT/len_scale_log.txt" 2>&1
               done
               kill $smi) ;;
    bwd-profile) timeout ${PROFILE_S:-200} python3 benchmarks/attn_bwd_profile.py --patterns ${BWD_PATTERNS:-sw1024,sw4096,causal} \
              > "$OUT/bwd_profile_log.txt" 2>&1 ;;
    wide64) timeout ${PACK_S:-300} python3 benchmarks/triton_pack_variants.py --round 15 --patterns sw4096 --L 65536 \
              --out "$OUT/wide64" --quick --repeat 3 > "$OUT/wide64_log.txt" 2>&1 ;;
    gluon-default) timeout ${GLUON_TEST_S:-400} python3 -m pytest -q -p no:cacheprovider tests/backends/test_gluon_fwd.py \
              > "$OUT/gluon_default_log.txt" 2>&1 ;;
    bwd-w8) timeout ${PACK_S:-240} python3 benchmarks/triton_pack_variants.py --round 9 \
              --patterns ${W8_PATTERNS:-sw1024,sinks+sw1024,causal} --out "$OUT/bwdw8" --quick > "$OUT/bwd_w8_log.txt" 2>&1 ;;
    bwd-kt) timeout ${PACK_S:-220} python3 benchmarks/triton_pack_variants.py --round 6 --patterns ${KT_PATTERNS:-causal,sw1024} \
              --out "$OUT" --quick > "$OUT/bwd_kt_log.txt" 2>&1 ;;
    kda-chunk) timeout ${LINEAR_S:-240} python3 benchmarks/linear_bench.py --out "$OUT/kdachunk" --check quick --no-decode \
              --no-torch --sweep-ops kda --sweep-only chunk --sweep-shape 2x8192 --profile-ops kda \
              --profile-shape 2x8192 --ops kda,gdn,sdpa --shapes 2x8192 > "$OUT/kda_chunk_log.txt" 2>&1 ;;
    kda-dot) timeout ${LINEAR_S:-240} python3 benchmarks/linear_bench.py --out "$OUT/kdadot" --check quick --no-decode \
              --no-torch --sweep-ops kda,gla --sweep-only dot,unroll-i1,scores-split --sweep-shape 2x8192 \
              --profile-ops kda,gla --profile-shape 2x8192 --ops kda,gla,gdn,sdpa --shapes 2x8192 \
              > "$OUT/kda_dot_log.txt" 2>&1 ;;
    dots-on) timeout ${LINEAR_S:-300} python3 benchmarks/linear_bench.py --out "$OUT/dotson" --check quick --no-decode \
              --no-torch --sweep-ops kda,gla --sweep-only no-dot,dot-fb60,ib-k32w4 --sweep-shape 2x8192 \
              --profile-ops kda,gla --profile-shape 2x8192 --ops simple_gla,gla,gdn,kda,sdpa \
              --shapes 2x8192,8x2048,4x8192 > "$OUT/dots_on_log.txt" 2>&1 ;;
    kda-main) timeout ${LINEAR_S:-200} python3 benchmarks/linear_bench.py --out "$OUT/kdamain" --check none --no-decode \
              --no-torch --sweep-ops kda --sweep-only ${KDA_ONLY:-main-split,main-fused,w16,b64w8,b16w4} \
              --sweep-shape 2x8192 --ops sdpa --shapes 1x1024 > "$OUT/kda_main_log.txt" 2>&1 ;;
    main-regs) timeout ${LINEAR_S:-330} python3 benchmarks/linear_bench.py --out "$OUT/mainregs" --check quick --no-decode \
              --no-torch --sweep-ops kda,gdn --sweep-only ${MAIN_ONLY:-main-,b64w8,b16w4,b32w16} --sweep-shape 2x8192 \
              --profile-ops kda,gdn --profile-shape 2x8192 --ops gla,gdn,kda,sdpa --shapes 2x8192,4x8192 \
              > "$OUT/main_regs_log.txt" 2>&1 ;;
    kda-rows) timeout ${LINEAR_S:-300} python3 benchmarks/linear_bench.py --out "$OUT/kdarows" --check quick --no-decode \
              --no-torch --profile-ops kda --profile-shape 2x8192 --sweep-ops kda --sweep-only dp-dul,da16,rc,gc-rows,p16,a16,all-opt-in --sweep-shape 2x8192 \
              --ops simple_gla,gla,gdn,kda,sdpa \
              --shapes 2x8192,1x16384,4x8192 > "$OUT/kda_rows_log.txt" 2>&1
              timeout ${LINEAR_S:-300} python3 benchmarks/linear_bench.py --out "$OUT/kdarows2" --check none --no-decode \
              --no-torch --ops kda,sdpa --shapes 2x8192,1x16384,4x8192,1x32768 >> "$OUT/kda_rows_log.txt" 2>&1 ;;
    kda-opt) timeout ${LINEAR_S:-300} python3 benchmarks/linear_bench.py --out "$OUT/kdaopt" --check none --no-decode \
              --no-torch --ops kda,sdpa --shapes 2x8192,4x8192 --kda-variants "${KDA_VARIANTS:-all-opt-in,fit32,fit32+all-opt-in,a16-p16-da16-rc-launches-gc-rows,rc-launches,p16,da16,a16,gc-rows,dp-dul}" \
              > "$OUT/kda_opt_log.txt" 2>&1
              timeout ${SWEEP_S:-270} python3 benchmarks/linear_bench.py --out "$OUT/kdasweep" --check none --no-decode \
              --no-torch --sweep-ops kda --sweep-only "${KDA_ONLY:-dp-dul,da16,rc,gc-rows,p16,a16,all-opt-in}" \
              --sweep-shape 2x8192 --ops sdpa --shapes 1x1024 >> "$OUT/kda_opt_log.txt" 2>&1 ;;
    kda-check) timeout ${CHECK_S:-240} python3 benchmarks/linear_bench.py --out "$OUT/kdacheck" --check quick --no-decode \
              --no-torch --profile-ops kda --profile-shape 2x8192 --ops sdpa --shapes 1x1024 > "$OUT/kda_check_log.txt" 2>&1
              timeout ${LINEAR_S:-150} python3 benchmarks/linear_bench.py --out "$OUT/kdacheck2" --check none --no-decode \
              --no-torch --ops gdn,kda,sdpa --shapes 2x8192,1x16384,4x8192,1x32768 \
              --kda-variants "${KDA_VARIANTS:-s14-default,no-da16,no-gc-rows,no-a16}" >> "$OUT/kda_check_log.txt" 2>&1 ;;
    kda-final) timeout ${LINEAR_S:-120} python3 benchmarks/linear_bench.py --out "$OUT/kdafinal" --check none --no-decode \
              --no-torch --ops gdn,kda,sdpa --shapes 2x8192,4x8192 --sweep-ops kda --sweep-only dp-dul,da16,rc,gc-rows,p16,a16,all-opt-in \
              --sweep-shape 2x8192 > "$OUT/kda_final_log.txt" 2>&1
              timeout ${LINEAR_S:-150} python3 benchmarks/linear_bench.py --out "$OUT/kdafinal" --check quick --no-decode \
              --no-torch --ops sdpa --shapes 1x1024 >> "$OUT/kda_final_log.txt" 2>&1 ;;
    linear-check) timeout ${LINEAR_S:-150} python3 benchmarks/linear_bench.py --out "$OUT" --check quick --no-torch \
              --no-decode --ops sdpa --shapes 8x2048 > "$OUT/linear_check_log.txt" 2>&1 ;;
    linear-sweep) timeout ${LINEAR_S:-300} python3 benchmarks/linear_bench.py --out "$OUT" --check none --no-decode --no-torch \
              --profile-ops gla,gdn,kda --sweep-ops gdn,gla,kda --ops sdpa --shapes 8x2048 > "$OUT/linear_sweep_log.txt" 2>&1 ;;
    decode-wide) timeout 120 python3 benchmarks/mla_decode_bench.py --out "$OUT/mla_decode.jsonl" > "$OUT/mla_log.txt" 2>&1 ;;
    routing) timeout ${ROUTING_S:-180} python3 benchmarks/routing_bench.py --lengths 32768,65536,131072 --profile --out "$OUT/routing.jsonl" > "$OUT/routing_log.txt" 2>&1 ;;
    pack) timeout ${PACK_S:-420} python3 benchmarks/triton_pack_variants.py --out "$OUT" --quick > "$OUT/pack_log.txt" 2>&1 ;;
    check) timeout ${CHECK_S:-300} python3 benchmarks/triton_check.py --out "$OUT" > "$OUT/check_log.txt" 2>&1
           timeout ${CHECK_S:-300} python3 benchmarks/triton_bwd_check.py --out "$OUT" >> "$OUT/check_log.txt" 2>&1 ;;
    narrow) timeout ${NARROW_S:-200} python3 benchmarks/triton_pack_variants.py --round 8 --patterns sinks+sw1024,sw1024 \
              --out "$OUT/narrow16k" --quick > "$OUT/narrow_log.txt" 2>&1
            timeout ${NARROW_S:-200} python3 benchmarks/triton_pack_variants.py --round 8 --patterns sinks+sw1024 \
              --L 65536 --out "$OUT/narrow64k" --quick >> "$OUT/narrow_log.txt" 2>&1 ;;
    pack2) timeout ${PACK_S:-300} python3 benchmarks/triton_pack_variants.py --round 2 --out "$OUT" --quick > "$OUT/pack2_log.txt" 2>&1 ;;
    layout) timeout ${LAYOUT_S:-240} python3 benchmarks/layout_share.py --out "$OUT/layout_share.jsonl" \
              > "$OUT/layout_share.txt" 2>&1 ;;
    smoke) timeout 120 python3 benchmarks/layout_gpu_smoke.py > "$OUT/smoke_log.txt" 2>&1 ;;
    nbhd-bwd) timeout ${NBHD_S:-200} python3 benchmarks/triton_nbhd_variants.py --bwd --out "$OUT" --quick > "$OUT/nbhd_bwd_log.txt" 2>&1 ;;
    nbhd-orders) timeout ${NBHD_S:-240} python3 benchmarks/triton_nbhd_variants.py --orders --out "$OUT" --quick \
              > "$OUT/nbhd_orders_log.txt" 2>&1
                 timeout ${NBHD_S:-300} python3 benchmarks/triton_nbhd_variants.py --bwd --in-place --out "$OUT" --quick \
              > "$OUT/nbhd_bwd_in_place_log.txt" 2>&1 ;;
    nbhd-fwd) timeout ${NBHD_S:-420} python3 benchmarks/triton_nbhd_variants.py --fwd-next --in-place --out "$OUT" --quick \
              > "$OUT/nbhd_fwd_next_log.txt" 2>&1 ;;
    nbhd) timeout ${NBHD_S:-240} python3 benchmarks/triton_nbhd_variants.py --out "$OUT" --quick > "$OUT/nbhd_log.txt" 2>&1 ;;
    pack3) timeout ${PACK_S:-200} python3 benchmarks/triton_pack_variants.py --round 3 --out "$OUT" --quick > "$OUT/pack3_log.txt" 2>&1
           timeout 120 python3 benchmarks/triton_pack_variants.py --round 3 --d 64 --patterns causal,sw1024 --out "$OUT" \
             --quick >> "$OUT/pack3_log.txt" 2>&1 ;;
    verify) timeout ${VERIFY_S:-300} python3 -m attnzoo.cli bench run --suite cuda --out "$OUT/verify" --no-report \
              --lengths 4096,16384,65536 --direction both --backend triton --backend flex --pattern sw4096 \
              --pattern 'blocksparse-*' --max-time-s 0.5 > "$OUT/verify_log.txt" 2>&1 ;;
    merge) timeout ${PACK_S:-240} python3 benchmarks/triton_pack_variants.py --round 5 --fwd-only --out "$OUT" --quick > "$OUT/merge_log.txt" 2>&1 ;;
    merge-bwd) timeout ${PACK_S:-240} python3 benchmarks/triton_pack_variants.py --round 5 --patterns ${MERGE_PATTERNS:-sw1024,sinks+sw1024,sw4096,causal} \
              --out "$OUT" --quick > "$OUT/merge_bwd_log.txt" 2>&1 ;;
    linear-b1) # GLA's state-kernel variants (nosplit: one rounding as fla; smaller state tiles for B = 1) with their
               # protocol check, at B=8 T=2048 and B=1 T=8192, then every op against SDPA at B=1 T=8192 (no fla needed)
              timeout ${LINEAR_S:-150} python3 benchmarks/linear_bench.py --out "$OUT" --check quick --no-decode --no-torch \
                --sweep-ops gla --sweep-only nosplit,h32 --ops sdpa --shapes 8x2048 > "$OUT/linear_b1_log.txt" 2>&1
              timeout ${LINEAR_S:-150} python3 benchmarks/linear_bench.py --out "$OUT" --check none --no-decode --no-torch \
                --sweep-ops gla --sweep-only nosplit,h32 --sweep-shape 1x8192 --ops simple_gla,gla,gdn,kda,sdpa \
                --shapes 1x8192 >> "$OUT/linear_b1_log.txt" 2>&1 ;;
    linear-b1b) # the state tiles of Gated DeltaNet / KDA / simple GLA at B=1 T=8192 (GLA now fits its tiles to B*H),
               # the GPU checks (GLA split / inter-split included), then every op against SDPA at B=1 T=8192
              timeout ${LINEAR_S:-200} python3 benchmarks/linear_bench.py --out "$OUT" --check quick --no-decode --no-torch \
                --sweep-ops gdn,kda --sweep-only h --sweep-shape 1x8192 --sweep --ops simple_gla,gla,gdn,kda,sdpa \
                --shapes 1x8192 > "$OUT/linear_b1b_log.txt" 2>&1 ;;
    linear-b1c) # every op against SDPA at B=1 T=8192 and 16384 with the fitted state tiles (run without fla on the path)
              timeout ${LINEAR_S:-90} python3 benchmarks/linear_bench.py --out "$OUT" --check none --no-decode --no-torch \
                --ops simple_gla,gla,gdn,kda,sdpa --shapes 1x8192,1x16384 > "$OUT/linear_b1c_log.txt" 2>&1 ;;
    gla-inter) # GLA's inter-chunk backward split per Dk block (+ the state-kernel variants), B=8 T=2048, no fla needed
              timeout ${LINEAR_S:-150} python3 benchmarks/linear_bench.py --out "$OUT" --check none --no-decode --no-torch \
                --sweep-ops gla --sweep-only inter,nosplit --ops sdpa --shapes 8x2048 > "$OUT/gla_inter_log.txt" 2>&1 ;;
    pack4) timeout ${PACK_S:-300} python3 benchmarks/triton_pack_variants.py --round 4 --out "$OUT" --quick > "$OUT/pack4_log.txt" 2>&1 ;;
    windows) for dir in both fwd; do  # 16K forward and forward+backward, then 64K forward (issue 3's local patterns)
               lens=16384; [ $dir = fwd ] && lens=65536
               timeout ${WINDOWS_S:-150} python3 -m attnzoo.cli bench run --suite cuda --out "$OUT/windows" --no-report \
                 --lengths $lens --direction $dir --backend triton --backend flex --backend sdpa-cudnn --pattern causal \
                 --pattern sw1024 --pattern sw4096 --pattern sinks+sw1024 --max-time-s 1.0 >> "$OUT/windows_log.txt" 2>&1
             done ;;
    grid-full) mkdir -p "$OUT/grid-full"
            [ -f benchmarks/results/h200-grid-full/results.jsonl ] && cp benchmarks/results/h200-grid-full/results.jsonl "$OUT/grid-full/"
            timeout ${GRID_S:-300} python3 -m attnzoo.cli bench run --suite cuda --out "$OUT/grid-full" --no-report \
              --lengths ${GRID_LENS:-1024,2048} --max-time-s 0.5 > "$OUT/grid_full_log.txt" 2>&1 ;;
    grid64) mkdir -p "$OUT/grid"  # resumes the committed grid (a re-run skips recorded cases)
            [ -f "$OUT/grid/results.jsonl" ] || cp benchmarks/results/h100-2026-11-23/grid/results.jsonl "$OUT/grid/"
            timeout 300 python3 -m attnzoo.cli bench run --suite cuda --out "$OUT/grid" --no-report --lengths 65536 \
              --direction fwdbwd --backend triton --backend flex --backend sdpa-cudnn > "$OUT/grid64_log.txt" 2>&1 ;;
    niah) timeout ${NIAH_S:-420} python3 -m attnzoo.cli bench niah --grid full --out "$OUT/niah" > "$OUT/niah_log.txt" 2>&1 ;;
    recall) timeout ${RECALL_S:-300} python3 -m attnzoo.cli bench recall --grid full --mixer sliding_window:32 \
              --mixer based:feature_dim=16:window=32 --tasks 256x16 --d-model 128 --lr 1e-3 --steps 4000 \
              --out "$OUT/recall" > "$OUT/recall_log.txt" 2>&1 ;;
    flash) timeout 300 python3 -m attnzoo.cli bench run --suite flash --out "$OUT/flash" --no-report > "$OUT/flash_log.txt" 2>&1 ;;
    *) echo "unknown section $s" ;;
  esac
  rc=$?; log=$(ls -t "$OUT"/*.txt | head -1); echo "   rc=$rc, last lines of $log:"; tail -25 "$log"
done
(cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tar czf "$OUT/triton_autotune.tgz" -T -) 2>/dev/null \
  && echo "autotune choices: $(tar tzf "$OUT/triton_autotune.tgz" | wc -l) files in $OUT/triton_autotune.tgz"
