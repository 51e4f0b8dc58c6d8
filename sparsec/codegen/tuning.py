"""Per-CPU tuning of the linear kernels, as data.

The loop structure of ``linear_kernel.py`` is fixed; how many row blocks it streams at
once, how many accumulators it splits the input over and how far ahead it prefetches
are measured constants, and the best values differ between microarchitectures and
ISAs (AVX2 has 16 vector registers where AVX-512 has 32). Each ``Tuning`` is one
(ISA, CPU) set, keyed by the ISA name and LLVM cpu name of the ``Target``; a CPU without
a row gets its ISA's default. Add a row only with the measurement behind it (the
kernel regression check's ``--emitter`` A/B and ``sparsec bench``), and say on which
CPU in the comment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# How a bitmask step's nonzeros reach their lanes (``Tuning.sparse_expand``):
# "memory": vpexpandb/vexpandps straight from the value stream (one instruction);
# "register": a plain vector load of the stream, then the register form of the expand
# (the streams end with a vector of slack, so the load never leaves the blob).
SPARSE_EXPANDS = ("memory", "register")
# ``sparsec compile --tuning``: "host" measures some fields on the compiling CPU
# (host_tuning.py), "builtin" keeps this table's; the manifest records those fields.
TUNING_MODES = ("host", "builtin")
HOST_MEASURED_FIELDS = ("sparse_expand", "decode_group", "wide_decode_group")


@dataclass(frozen=True)
class Tuning:
    # Token tile sizes, largest first; n_tokens is covered greedily (e.g. 13 = 8 + 4 + 1).
    # A 2-token tile (batched decode of 2, 3, 6, 7 streams) reads each weight once where
    # two single-token passes read it twice.
    token_tiles: tuple[int, ...] = (8, 4, 2, 1)
    # Row blocks computed together in multi-token tiles (register tiling over rows too:
    # a tile of T tokens x G blocks needs T + G loads per T * G multiply-adds). Measured
    # on the 30-layer stack at 16-64 tokens: 1.3-1.7x over G = 1. int8 stays at 2 because
    # its broadcasts need registers (G = 3 spills).
    block_group: dict[str, int] = field(default_factory=lambda: {"fp32": 3, "int8": 2})
    # Decode: row blocks streamed together (sharing each broadcast activation). Several
    # weight streams in flight beat one: measured on the 30-layer stack from DRAM at 2
    # threads, against one block with 4 accumulators: bitmask fp32 (70%) 1.21x with 6
    # blocks, dense fp32 1.15x and dense int8 1.17x with 4; bitmask int8 is best alone
    # (vpexpandb throughput bound, 0.93x with 2).
    decode_group: dict[str, int] = field(
        default_factory=lambda: {"dense_f32": 4, "bitmask_f32": 6, "dense_i8": 4, "bitmask_i8": 1}
    )
    # ... for layers with at least wide_decode_inputs inputs: more weight streams in
    # flight pay off once each block's stream is long. Measured on the Intel Xeon
    # (Sapphire Rapids class), 2 threads, 70%, weights from DRAM, bitmask_i8 1 -> 2
    # blocks: 8192x2048 324 -> 282 us, 2048x8192 271 -> 225, 2048x2048 93 -> 79,
    # 11008x4096 25.3 -> 29.3 GB/s, 4096x11008 29.8 -> 35.0, 4096x4096 24.5 -> 29.3,
    # 576x1536 12.0 -> 10.3 us; at 576 inputs mixed (576x576 3.3 -> 4.0 us, 192x576
    # 1.7 -> 1.4, 1536x576 12.9 -> 13.2).
    wide_decode_group: dict[str, int] = field(default_factory=lambda: {"bitmask_i8": 2})
    wide_decode_inputs: int = 1024
    # Decode: independent accumulators along the input, split among the streamed blocks
    # (hides the FMA/VNNI latency).
    decode_accumulators: int = 4
    # Software prefetch distance ahead of each weight stream, in bytes. Shorter for
    # bitmask fp32, whose 6 interleaved decode streams would otherwise evict each other's
    # lines (measured 1.05x with 512 over 2048; the other formats are flat within noise).
    prefetch_bytes: dict[str, int] = field(
        default_factory=lambda: {
            "dense_f32": 2048,
            "bitmask_f32": 512,
            "dense_i8": 2048,
            "bitmask_i8": 2048,
        }
    )
    # The same in multi-token tiles (prefill, batched decode), every format: each weight
    # vector takes a tile's worth of multiply-adds, so the stream must be fetched from
    # further ahead to stay in flight. Measured on the Intel Xeon (Sapphire Rapids
    # class), 2 threads, 70% sparse, weights from DRAM, 8 tokens: bitmask_i8 3072x576
    # 81 -> 48 us, 576x1536 34 -> 26, 960x576 28 -> 18, dense_i8 49152x576 1122 -> 912,
    # bitmask_f32 3072x576 156 -> 145, dense_f32 flat; 32 KiB no better than 16 KiB.
    # The avx2 kernels on the same CPU, 4 tokens: bitmask_i8 3072x576 122 -> 85 us,
    # dense_i8 49152x576 1740 -> 1039 (8 KiB the same as 16 KiB).
    tile_prefetch_bytes: int = 16384
    # AMX (avx512-amx): row blocks multiplied together in multi-token int8 calls, each
    # with its own accumulator tile (independent tdpbusd chains) sharing the tokens' A
    # tile. Measured on the Intel Xeon (Sapphire Rapids class), 1 thread, 1536x576 70%
    # from L2, 64 tokens: bitmask_i8 1 block 130 us, 2 blocks 69, 3 blocks 75, 4 blocks
    # 82 (vector tiles 224); dense_i8 200 / 96 / 160 / 138 (vector 176).
    amx_blocks: int = 2
    # ... and from how many tokens a call uses AMX rather than the vector tiles. The
    # 30-layer stack, 70% sparse, weights from DRAM, 2 threads, bitmask_i8 vector vs AMX:
    # 8 tokens 2.18 vs 3.26 ms (the expand stream no longer overlaps the multiplies),
    # 16 tokens 3.97 vs 3.49, 32 tokens 7.48 vs 6.10, 64 tokens 14.8 vs 8.3; dense_i8
    # 8 tokens 3.56 vs 3.38, 16: 4.73 vs 3.33, 64: 15.3 vs 9.5.
    amx_min_tokens: int = 16
    # Bitmask decode on expand ISAs (SPARSE_EXPANDS), per format. The memory form is one
    # instruction; a micro-benchmark on AMD Zen 4 measured it at 1.45 ns a vector
    # against 0.73 ns for a load then the register form (the sparse-kernels issue). On
    # the Intel Xeon (Sapphire Rapids class), 1 thread, weights from DRAM on huge pages,
    # median of 5, bitmask_i8 memory vs register: 1536x576 50% 22.3 / 22.7 us, 70% 20.7 /
    # 19.1, 90% 15.5 / 15.1; 576x1536 50% 22.2 / 21.5, 70% 25.7 / 21.6 (noisy), 90% 34.9
    # / 34.2: a tie, so the one-instruction form stays the default. ``sparsec compile``
    # measures both on the host (host_tuning.py) and keeps the faster per CPU model,
    # as it does for the bitmask decode groups above.
    sparse_expand: dict[str, str] = field(
        default_factory=lambda: {"bitmask_f32": "memory", "bitmask_i8": "memory"}
    )


# The measurements above were made on the AVX-512 machines of sessions 1-10 (Intel Xeon,
# Sapphire Rapids class, and AMD EPYC Zen 4); no CPU has a measured set of its own yet.
DEFAULT = Tuning()
# AVX2 (16 ymm registers): a multi-token tile of T tokens x G blocks holds T*G
# accumulators, G weights and a broadcast, so 4 x 2 (11 registers; int8 adds 3
# temporaries for vpsignb/vpmaddubsw/vpmaddwd) rather than AVX-512's 8 x 3.
AVX2_DEFAULT = Tuning(
    token_tiles=(4, 2, 1),
    block_group={"fp32": 2, "int8": 2},
    wide_decode_group={},  # not measured with the shuffle decode
)
ISA_DEFAULTS: dict[str, Tuning] = {"avx2": AVX2_DEFAULT, "avx2-vnni": AVX2_DEFAULT}
# (isa name, LLVM cpu) -> measured set.
TUNINGS: dict[tuple[str, str], Tuning] = {}


def decode_group(tuning: Tuning, fmt: str, in_features: int) -> int:
    """Row blocks a decode call streams together for a layer of this format and width."""
    if in_features >= tuning.wide_decode_inputs and fmt in tuning.wide_decode_group:
        return tuning.wide_decode_group[fmt]
    return tuning.decode_group[fmt]


def tuning_for(isa: str, cpu: str) -> Tuning:
    """The tuning of ISA ``isa`` on the LLVM cpu ``cpu`` (the ISA's default when the CPU
    has no row)."""
    return TUNINGS.get((isa, cpu), ISA_DEFAULTS.get(isa, DEFAULT))
