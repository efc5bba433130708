// The AMX block fold (amx.h). Compiled without ISA flags: every function that uses the tiles or
// AVX-512 carries its target attribute, and runs only after Supported() said yes.
#include "engine/cpu/amx.h"

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "engine/base/error.h"
#include "engine/cpu/avx512.h"

#define NEEDLE_AMX_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")))

namespace needle::amx {
namespace {

constexpr int kArchReqXcompPerm = 0x1023;  // arch_prctl: ask for an XSAVE feature
constexpr int kXfeatureXtiledata = 18;

bool Detect() {
  if (!avx512::HasBf16()) return false;  // (AVX-512 F, BW, VL, DQ, BF16, saved by the OS)
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool amx_bf16 = (d & (1u << 22)) != 0, amx_tile = (d & (1u << 24)) != 0;
  if (!amx_bf16 || !amx_tile) return false;
  // The OS grants this process the tile data (Linux 5.16 and later).
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

std::atomic<int> g_mode{static_cast<int>(Mode::kFromEnv)};

// Tile configuration (palette 1): tiles 0-7 all 16 rows of 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette, start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// dst rows [0, rows) (dst_stride floats apart) = columns of the 16x16 block src [16][16].
NEEDLE_AMX_TARGET inline void Transpose16(const float* src, float* dst, int64_t dst_stride,
                                          int64_t rows) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + 16 * i);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // r[4i + j], 128-bit lane L: column 4L + j of rows 4i .. 4i + 3.
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);
    t[4 + j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
    t[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
    t[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xDD);
    r[4 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0xDD);
  }
  for (int64_t i = 0; i < rows; ++i) _mm512_storeu_ps(dst + i * dst_stride, r[i]);
}

// Copies rows [0, n) of a [n, D] bf16 piece into `dst` [32][D], zero past n.
void PadRows(const uint16_t* src, int64_t n, int64_t D, std::vector<uint16_t>* dst) {
  dst->assign(static_cast<size_t>(32 * D), 0);
  std::memcpy(dst->data(), src, static_cast<size_t>(n * D) * sizeof(uint16_t));
}

// S [np][16] f32 = the padded piece's keys times the query tiles (tiles 0 .. NC-1).
template <int NC>
NEEDLE_AMX_TARGET void Scores(const Query& q, const uint16_t* k, const uint16_t* ktail,
                              int64_t nfull, int64_t np, int64_t D, float* s) {
  const int64_t kstride = D * 2;
  _tile_loadd(0, q.tiles[0], 64);
  if (NC > 1) _tile_loadd(1, q.tiles[1], 64);
  if (NC > 2) _tile_loadd(2, q.tiles[2], 64);
  if (NC > 3) _tile_loadd(3, q.tiles[3], 64);
  for (int64_t j = 0; j < np; j += 32) {
    const uint16_t* rows = j < nfull ? k + j * D : ktail;
    _tile_zero(4);
    _tile_zero(5);
    _tile_loadd(6, rows, kstride);
    _tile_loadd(7, rows + 16 * D, kstride);
    _tile_dpbf16ps(4, 6, 0);
    _tile_dpbf16ps(5, 7, 0);
    if (NC > 1) {
      _tile_loadd(6, rows + 32, kstride);
      _tile_loadd(7, rows + 16 * D + 32, kstride);
      _tile_dpbf16ps(4, 6, 1);
      _tile_dpbf16ps(5, 7, 1);
    }
    if (NC > 2) {
      _tile_loadd(6, rows + 64, kstride);
      _tile_loadd(7, rows + 16 * D + 64, kstride);
      _tile_dpbf16ps(4, 6, 2);
      _tile_dpbf16ps(5, 7, 2);
    }
    if (NC > 3) {
      _tile_loadd(6, rows + 96, kstride);
      _tile_loadd(7, rows + 16 * D + 96, kstride);
      _tile_dpbf16ps(4, 6, 3);
      _tile_dpbf16ps(5, 7, 3);
    }
    _tile_stored(4, s + j * 16, 64);
    _tile_stored(5, s + (j + 16) * 16, 64);
  }
}

// o (even / odd channels, [16][D/2] f32 each) = P [16][np] x the piece's values, 16 rows at a
// time read as B: tile row k holds value row k's channels in pairs (2n, 2n + 1), so A = P's
// (p, 0) pairs yields the even channels and (0, p) the odd ones. Chunks of 32 channels, two at
// a time: C tiles 0-3 (even / odd of each), A tiles 4-5, B tiles 6-7.
// kPacked (G <= 8): one A tile holds both, (p, 0) in rows 0-7 and (0, p) in rows 8-15, and
// one C tile per chunk the even channels of the heads in rows 0-7, the odd ones in 8-15 (oo is
// then oe + 8 rows): half the tile products.
template <bool kTwo, bool kPacked>
NEEDLE_AMX_TARGET void ValueChunks(const uint32_t* pe, const uint32_t* po, const uint16_t* v,
                                   const uint16_t* vtail, int64_t nfull, int64_t np, int64_t D,
                                   int64_t c, float* oe, float* oo) {
  const int64_t vstride = D * 2, pstride = np * 4, half = D / 2;
  _tile_zero(0);
  _tile_zero(1);
  if (kTwo) {
    _tile_zero(2);
    _tile_zero(3);
  }
  if (kPacked) {
    for (int64_t j = 0; j < np; j += 16) {
      const uint16_t* rows = j < nfull ? v + j * D : vtail + (j - nfull) * D;
      _tile_loadd(4, pe + j, pstride);
      _tile_loadd(6, rows + 32 * c, vstride);
      _tile_dpbf16ps(0, 4, 6);
      if (kTwo) {
        _tile_loadd(7, rows + 32 * c + 32, vstride);
        _tile_dpbf16ps(2, 4, 7);
      }
    }
    _tile_stored(0, oe + 16 * c, half * 4);
    if (kTwo) _tile_stored(2, oe + 16 * c + 16, half * 4);
    return;
  }
  for (int64_t j = 0; j < np; j += 16) {
    const uint16_t* rows = j < nfull ? v + j * D : vtail + (j - nfull) * D;
    _tile_loadd(4, pe + j, pstride);
    _tile_loadd(5, po + j, pstride);
    _tile_loadd(6, rows + 32 * c, vstride);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 5, 6);
    if (kTwo) {
      _tile_loadd(7, rows + 32 * c + 32, vstride);
      _tile_dpbf16ps(2, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, oe + 16 * c, half * 4);
  _tile_stored(1, oo + 16 * c, half * 4);
  if (kTwo) {
    _tile_stored(2, oe + 16 * c + 16, half * 4);
    _tile_stored(3, oo + 16 * c + 16, half * 4);
  }
}

}  // namespace

bool Supported() {
  static const bool ok = Detect();
  return ok;
}

void SetMode(Mode m) { g_mode.store(static_cast<int>(m)); }

bool Use(int64_t G, int64_t D, bool prefill) {
  static const Mode env = [] {
    const char* e = std::getenv("NEEDLE_CPU_AMX");
    if (e != nullptr && std::strcmp(e, "0") == 0) return Mode::kOff;
    if (e != nullptr && std::strcmp(e, "1") == 0) return Mode::kOn;
    return Mode::kAuto;
  }();
  Mode m = static_cast<Mode>(g_mode.load(std::memory_order_relaxed));
  if (m == Mode::kFromEnv) m = env;
  if (m == Mode::kOff || !Supported() || !Fits(G, D)) return false;
  return m == Mode::kOn || prefill || G >= kAutoMinGroup;
}

bool Fits(int64_t G, int64_t D) { return G >= 1 && G <= 16 && D % 32 == 0 && D >= 32 && D <= 128; }

NEEDLE_AMX_TARGET void PrepareQuery(const float* q, int64_t G, int64_t D, float scale, Query* out) {
  NEEDLE_CHECK(Fits(G, D));
  std::memset(out->tiles, 0, sizeof(out->tiles));
  out->G = G, out->D = D;
  // Channels 32c .. 32c + 31 of head g, rounded: 16 pairs, pair r to tile c's row r, column g.
  const __m512i rows =
      _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                         _mm512_set1_epi32(16));
  const __m512 vs = _mm512_set1_ps(scale);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t c = 0; c < D / 32; ++c) {
      const float* x = q + g * D + 32 * c;
      const __m512i pairs = (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(_mm512_loadu_ps(x + 16), vs),
                                                         _mm512_mul_ps(_mm512_loadu_ps(x), vs));
      _mm512_i32scatter_epi32(reinterpret_cast<int32_t*>(out->tiles[c]) + g, rows, pairs, 4);
    }
}

// (A constant in memory: GCC's ldtilecfg reads its operand as 8 bytes, so stores to a local
// configuration past them would be dropped as dead.)
constexpr TileConfig kTileConfig = {
    1, 0, {}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

Folder& ThreadFolder() {
  thread_local Folder f;
  return f;
}

NEEDLE_AMX_TARGET void Folder::Begin() { _tile_loadconfig(&kTileConfig); }

NEEDLE_AMX_TARGET void Folder::End() { _tile_release(); }

NEEDLE_AMX_TARGET void Folder::Fold(const Query& q, const uint16_t* k, const uint16_t* v, int64_t n,
                                    PartialAttention* part, float* stats, const uint16_t* next_k,
                                    const uint16_t* next_v, int64_t next_bytes) {
  if (n <= 0) return;
  // The next piece to L2, all of it up front: the tiles of this one take long enough.
  if (next_k != nullptr)
    for (int64_t o = 0; o < next_bytes; o += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(next_k) + o, _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(next_v) + o, _MM_HINT_T1);
    }
  const int64_t G = q.G, D = q.D, nfull = n / 32 * 32, np = (n + 31) / 32 * 32;
  const bool packed = G <= 8;  // P's even and odd pairs share one A tile
  if (nfull < n) {
    PadRows(k + nfull * D, n - nfull, D, &ktail_);
    PadRows(v + nfull * D, n - nfull, D, &vtail_);
  }
  s_.resize(static_cast<size_t>(np * 16));
  st_.resize(static_cast<size_t>(np * 16));
  // (P's rows >= G keep earlier values: finite, and they only reach O's rows >= G.)
  pe_.resize(static_cast<size_t>(np * 16));
  po_.resize(static_cast<size_t>(np * 16));
  oe_.resize(static_cast<size_t>(8 * D));
  oo_.resize(static_cast<size_t>(8 * D));
  switch (D / 32) {
    case 1:
      Scores<1>(q, k, ktail_.data(), nfull, np, D, s_.data());
      break;
    case 2:
      Scores<2>(q, k, ktail_.data(), nfull, np, D, s_.data());
      break;
    case 3:
      Scores<3>(q, k, ktail_.data(), nfull, np, D, s_.data());
      break;
    default:
      Scores<4>(q, k, ktail_.data(), nfull, np, D, s_.data());
      break;
  }
  // S^T: each head's scores in a row (only the G heads').
  for (int64_t j = 0; j < np; j += 16) Transpose16(s_.data() + j * 16, st_.data() + j, np, G);
  // Online softmax per head, 16 keys a vector; keys past n count as absent.
  float corr[16];
  for (int64_t g = 0; g < G; ++g) {
    const float* s = st_.data() + g * np;
    PartialAttention& P = part[g];
    const float mx = std::max(P.m, avx512::MaxOf(s, n));
    corr[g] = P.empty() ? 0.0f : std::exp(P.m - mx);
    const __m512 vmx = _mm512_set1_ps(mx);
    __m512 vsum = _mm512_setzero_ps();
    uint32_t *pe = pe_.data() + g * np, *po = packed ? pe + 8 * np : po_.data() + g * np;
    for (int64_t j = 0; j < np; j += 16) {
      const __mmask16 live = avx512::Live(n - j);
      const __m512 e =
          _mm512_maskz_mov_ps(live, avx512::Exp(_mm512_sub_ps(_mm512_loadu_ps(s + j), vmx)));
      const __m512i b = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(e));
      const __m512i hi = _mm512_slli_epi32(b, 16);  // (0, p): also p as f32
      _mm512_storeu_si512(pe + j, b);
      _mm512_storeu_si512(po + j, hi);
      vsum = _mm512_add_ps(vsum, _mm512_castsi512_ps(hi));
    }
    const float sum = _mm512_reduce_add_ps(vsum);
    P.l = P.l * corr[g] + sum;
    P.m = mx;
    P.n += n;
    if (stats != nullptr) stats[2 * g] = mx, stats[2 * g + 1] = sum;
  }
  for (int64_t c = 0; c < D / 32; c += 2) {
    const bool two = c + 1 < D / 32;
    const uint32_t *pe = pe_.data(), *po = po_.data();
    const uint16_t* vt = vtail_.data();
    float *oe = oe_.data(), *oo = oo_.data();
    if (packed && two)
      ValueChunks<true, true>(pe, po, v, vt, nfull, np, D, c, oe, oo);
    else if (packed)
      ValueChunks<false, true>(pe, po, v, vt, nfull, np, D, c, oe, oo);
    else if (two)
      ValueChunks<true, false>(pe, po, v, vt, nfull, np, D, c, oe, oo);
    else
      ValueChunks<false, false>(pe, po, v, vt, nfull, np, D, c, oe, oo);
  }
  // out = out * corr + O, O's channels interleaved back from their even and odd halves.
  alignas(64) static const int32_t kLo[16] = {0, 16, 1, 17, 2, 18, 3, 19,
                                              4, 20, 5, 21, 6, 22, 7, 23};
  alignas(64) static const int32_t kHi[16] = {8,  24, 9,  25, 10, 26, 11, 27,
                                              12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i lo = _mm512_load_si512(kLo), hi = _mm512_load_si512(kHi);
  for (int64_t g = 0; g < G; ++g) {
    const __m512 c = _mm512_set1_ps(corr[g]);
    float* out = part[g].out;
    const float* e = oe_.data() + g * (D / 2);
    const float* o = packed ? e + 8 * (D / 2) : oo_.data() + g * (D / 2);
    for (int64_t d = 0; d < D; d += 32) {
      const __m512 ve = _mm512_loadu_ps(e + d / 2), vo = _mm512_loadu_ps(o + d / 2);
      _mm512_storeu_ps(out + d, _mm512_fmadd_ps(_mm512_loadu_ps(out + d), c,
                                                _mm512_permutex2var_ps(ve, lo, vo)));
      _mm512_storeu_ps(out + d + 16, _mm512_fmadd_ps(_mm512_loadu_ps(out + d + 16), c,
                                                     _mm512_permutex2var_ps(ve, hi, vo)));
    }
  }
}

}  // namespace needle::amx
