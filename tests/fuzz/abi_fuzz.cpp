/*
 * A fuzz driver for every C ABI entry point of the CPU library, built with the library's sources
 * under AddressSanitizer + UndefinedBehaviorSanitizer (tests/fuzz/build.py).
 *
 * An input is a little program: each call takes a selector byte (which entry point), then the
 * arguments from the following bytes (dtype, quant type, blocksize and count mostly valid, sometimes
 * anything; each pointer a buffer of exactly the size kbit.h asks for, or NULL), then the input
 * values (any bit patterns: NaN, inf, subnormals included). What is checked:
 *   - the sanitizers: no out-of-bounds access, no undefined behaviour, no crash;
 *   - a refused call (status != 0) wrote nothing: every output buffer keeps its fill pattern;
 *   - an accepted call gives the same bytes with the default path (SIMD, 3 threads) and the portable
 *     one (KBIT_CPU_SIMD=0, 1 thread); the GEMV, whose FMA kernel sums in its own order, within
 *     kbit.h's float32 bound of the float64 product of the dequantized weight (and the rounding to
 *     the output dtype);
 *   - quantize then dequantize of finite values stays within half the codebook's largest gap times
 *     the block's absmax (plus rounding to the dtype).
 * A failed check prints what failed and aborts (so a fuzzer or a test sees a crash).
 *
 * With clang's libFuzzer (KBIT_LIBFUZZER) LLVMFuzzerTestOneInput is the entry; otherwise main():
 *   abi_fuzz replay FILE...                    run each input once
 *   abi_fuzz fuzz SECONDS CORPUS_DIR [SEED]    mutate the corpus' inputs at random for SECONDS; each
 *                                              input is written to ./crash-input before it runs (left
 *                                              behind when it fails; 10 s without an end is a failure)
 */
#include <dirent.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "kbit.h"

namespace {

struct Reader {
  const uint8_t* p;
  size_t n;
  uint8_t u8() {
    if (n == 0) return 0;
    --n;
    return *p++;
  }
  uint32_t u32() {
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v |= (uint32_t)u8() << (8 * i);
    return v;
  }
  bool done() const { return n == 0; }
};

[[noreturn]] void fail(const char* what, const char* entry) {
  fprintf(stderr, "abi_fuzz: %s: %s\n", entry, what);
  abort();
}

/* A buffer of exactly `bytes` (so reading past it is an AddressSanitizer report), filled with a
 * pattern, or none (NULL) when `null`. */
struct Buffer {
  std::vector<uint8_t> storage;
  bool null = false;
  Buffer() = default;
  Buffer(size_t bytes, bool is_null) : null(is_null) {
    if (!null) storage.assign(bytes, 0xA5);
  }
  uint8_t* ptr() { return null ? nullptr : (storage.empty() ? reinterpret_cast<uint8_t*>(this) : storage.data()); }
};

int64_t pick_count(Reader& r, bool& huge) {
  huge = false;
  uint8_t k = r.u8();
  if (k < 200) return (int64_t)(r.u32() % 3000);
  if (k < 215) return 0;
  if (k < 230) return -(int64_t)(r.u32() % 1000) - 1;
  huge = true;  /* refused before anything is touched: too large for any buffer */
  return INT64_MAX - (int64_t)(r.u32() % 1000);
}

int32_t pick_blocksize(Reader& r, int32_t low) {
  uint8_t k = r.u8();
  if (k < 220) return low << (r.u8() % (low == 32 ? 8 : 7));
  return (int32_t)r.u32();
}

int pick_dtype(Reader& r) {
  uint8_t k = r.u8();
  return k < 240 ? k % 3 : (int)(int8_t)r.u8();
}

int pick_quant(Reader& r) {
  uint8_t k = r.u8();
  return k < 240 ? k % 2 : (int)(int8_t)r.u8();
}

bool pick_null(Reader& r) { return r.u8() >= 245; }

size_t esize(int dtype) { return dtype == KBIT_DTYPE_F32 ? 4 : 2; }

/* Values: raw bit patterns (any float, NaN/inf included) or, mostly, ordinary numbers. */
void fill_values(Reader& r, Buffer& b, int dtype) {
  if (b.null) return;
  size_t es = dtype == KBIT_DTYPE_F32 ? 4 : 2, count = b.storage.size() / es;
  bool raw = r.u8() >= 200;
  uint32_t seed = r.u32() | 1u;
  for (size_t i = 0; i < count; ++i) {
    seed = seed * 1664525u + 1013904223u;
    uint32_t bits;
    if (raw || (seed >> 28) == 0) {
      bits = seed ^ (seed << 7);
    } else {
      float v = ((int32_t)(seed >> 8) - (1 << 23)) / (float)(1 << 21);
      memcpy(&bits, &v, 4);
    }
    if (es == 4) memcpy(&b.storage[4 * i], &bits, 4);
    else {
      uint16_t h = (uint16_t)(bits >> 16);
      memcpy(&b.storage[2 * i], &h, 2);
    }
  }
}

void fill_bytes(Reader& r, Buffer& b) {
  uint32_t seed = r.u32() | 1u;
  for (auto& c : b.storage) {
    seed = seed * 1664525u + 1013904223u;
    c = (uint8_t)(seed >> 24);
  }
}

/* A sorted 256-entry codebook in [-1, 1] (signed) or [0, 1], with some repeated entries. */
void fill_codebook(Reader& r, Buffer& b, bool is_signed) {
  if (b.null) return;
  float v[256];
  uint32_t seed = r.u32() | 1u;
  for (int i = 0; i < 256; ++i) {
    seed = seed * 1664525u + 1013904223u;
    v[i] = (seed >> 8) / (float)(1 << 24);
    if (is_signed) v[i] = 2 * v[i] - 1;
    if ((seed & 31) == 0 && i > 0) v[i] = v[i - 1];
  }
  for (int i = 1; i < 256; ++i)
    for (int j = i; j > 0 && v[j - 1] > v[j]; --j) {
      float t = v[j];
      v[j] = v[j - 1];
      v[j - 1] = t;
    }
  v[0] = is_signed ? -1.0f : 0.0f;
  v[255] = 1.0f;
  memcpy(b.storage.data(), v, sizeof v);
}

float as_float(const Buffer& b, size_t i, int dtype) {
  if (dtype == KBIT_DTYPE_F32) {
    float f;
    memcpy(&f, &b.storage[4 * i], 4);
    return f;
  }
  uint16_t h;
  memcpy(&h, &b.storage[2 * i], 2);
  if (dtype == KBIT_DTYPE_BF16) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
  }
  /* float16 */
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 31, m = h & 1023;
  float f = e == 0 ? ldexpf((float)m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexpf((float)(m | 1024), (int)e - 25);
  return sign ? -f : f;
}

struct Env {
  /* The default path with several threads, then the portable loops on one thread. */
  static void set(bool portable) {
    setenv("KBIT_CPU_SIMD", portable ? "0" : "1", 1);
    setenv("KBIT_NUM_THREADS", portable ? "1" : "3", 1);
  }
};

std::vector<Buffer> copies(const std::vector<Buffer*>& bufs) {
  std::vector<Buffer> out;
  for (Buffer* b : bufs) out.push_back(*b);
  return out;
}

void restore(const std::vector<Buffer*>& bufs, const std::vector<Buffer>& saved) {
  for (size_t i = 0; i < bufs.size(); ++i) *bufs[i] = saved[i];
}

bool exact(const std::vector<Buffer>& a, const std::vector<Buffer*>& b) {
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i].storage != b[i]->storage) return false;
  return true;
}

/* Runs call() on the default and the portable path (in/out buffers restored in between); checks
 * that a refused call wrote nothing and that both paths agree (agree(default's, portable's)).
 * Returns the status. */
template <typename Call, typename Agree>
int twice(const char* entry, const std::vector<Buffer*>& outs, Call call, Agree agree) {
  std::vector<Buffer> before = copies(outs);
  Env::set(false);
  int status = call();
  if (status != KBIT_OK) {
    if (!exact(before, outs)) fail("a refused call wrote to an output", entry);
    return status;
  }
  std::vector<Buffer> first = copies(outs);
  restore(outs, before);
  Env::set(true);
  int again = call();
  Env::set(false);
  if (again != status) fail("the portable path returned another status", entry);
  if (!agree(first, outs)) fail("the portable path gave other results than the default one", entry);
  return status;
}

template <typename Call>
int twice(const char* entry, const std::vector<Buffer*>& outs, Call call) {
  return twice(entry, outs, call, exact);
}

/* The 16 entries of a 4-bit codebook, as the library decodes them (absmax 1). */
void codebook4(int qt, float* out) {
  uint8_t packed[8];
  for (int i = 0; i < 8; ++i) packed[i] = (uint8_t)((2 * i) << 4 | (2 * i + 1));
  float one = 1.0f;
  if (kbit_dequantize_4bit(KBIT_DTYPE_F32, qt, packed, &one, out, 16, 32, nullptr) != KBIT_OK)
    fail("cannot decode the codebook", "kbit_dequantize_4bit");
}

void one_call(Reader& r) {
  const uint8_t sel = r.u8() % 6;
  bool huge = false;
  switch (sel) {
    case 0: case 1: {  /* 8-bit blockwise: quantize, then dequantize its codes */
      int dtype = pick_dtype(r);
      int64_t n = pick_count(r, huge);
      int32_t bs = pick_blocksize(r, 64);
      size_t cnt = n > 0 && !huge ? (size_t)n : 0, es = (dtype >= 0 && dtype <= 2) ? esize(dtype) : 4;
      size_t nb = bs > 0 ? (cnt + bs - 1) / bs : 0;
      Buffer A(cnt * es, pick_null(r)), code(1024, pick_null(r)), out(cnt, pick_null(r)), absmax(4 * nb, pick_null(r));
      fill_values(r, A, dtype);
      fill_codebook(r, code, true);
      int s = twice("kbit_quantize_blockwise_8bit", {&out, &absmax}, [&] {
        return kbit_quantize_blockwise_8bit(dtype, A.ptr(), (float*)code.ptr(), out.ptr(), (float*)absmax.ptr(), n,
                                            bs, nullptr);
      });
      if (s != KBIT_OK) return;
      Buffer back(cnt * es, pick_null(r));
      s = twice("kbit_dequantize_blockwise_8bit", {&back}, [&] {
        return kbit_dequantize_blockwise_8bit(dtype, out.ptr(), (float*)code.ptr(), (float*)absmax.ptr(), back.ptr(),
                                              n, bs, nullptr);
      });
      if (s != KBIT_OK || cnt == 0) return;
      /* round trip: |x - y| <= absmax * (largest gap / 2 + the grid step) + dtype rounding */
      float gap = 0, cb[256];
      memcpy(cb, code.storage.data(), sizeof cb);
      for (int i = 1; i < 256; ++i) gap = fmaxf(gap, cb[i] - cb[i - 1]);
      for (size_t i = 0; i < cnt; ++i) {
        float x = as_float(A, i, dtype), y = as_float(back, i, dtype), m;
        memcpy(&m, &absmax.storage[4 * (i / bs)], 4);
        if (!isfinite(x) || !isfinite(m) || m > 1e30f || m < 1e-30f) continue;
        /* the output's rounding to dtype is relative to the output y, not the input */
        float tol = m * (gap / 2 + 4.0f / 65535.0f) + (fabsf(x) + fabsf(y)) * (dtype == KBIT_DTYPE_F32 ? 1e-6f : 1e-2f) +
                    1e-30f;
        if (!(fabsf(x - y) <= tol)) {
          fprintf(stderr, "abi_fuzz: dtype %d, blocksize %d, value %zu of %zu: %.9g -> %.9g, absmax %.9g, gap %.3g\n",
                  dtype, bs, i, cnt, x, y, m, gap);
          fail("8-bit round trip error above the codebook's bound", "kbit_*_blockwise_8bit");
        }
      }
      return;
    }
    case 2: case 3: {  /* 4-bit: quantize, then dequantize */
      int dtype = pick_dtype(r), qt = pick_quant(r);
      int64_t n = pick_count(r, huge);
      int32_t bs = pick_blocksize(r, 32);
      size_t cnt = n > 0 && !huge ? (size_t)n : 0, es = (dtype >= 0 && dtype <= 2) ? esize(dtype) : 4;
      size_t nb = bs > 0 ? (cnt + bs - 1) / bs : 0;
      Buffer A(cnt * es, pick_null(r)), packed((cnt + 1) / 2, pick_null(r)), absmax(4 * nb, pick_null(r));
      fill_values(r, A, dtype);
      int s = twice("kbit_quantize_4bit", {&packed, &absmax}, [&] {
        return kbit_quantize_4bit(dtype, qt, A.ptr(), packed.ptr(), (float*)absmax.ptr(), n, bs, nullptr);
      });
      if (s != KBIT_OK) return;
      Buffer back(cnt * es, pick_null(r));
      s = twice("kbit_dequantize_4bit", {&back}, [&] {
        return kbit_dequantize_4bit(dtype, qt, packed.ptr(), (float*)absmax.ptr(), back.ptr(), n, bs, nullptr);
      });
      if (s != KBIT_OK) return;
      const float half_gap = qt == KBIT_QUANT_NF4 ? 0.16f : 0.17f;  /* half the widest gap of either codebook */
      for (size_t i = 0; i < cnt; ++i) {
        float x = as_float(A, i, dtype), y = as_float(back, i, dtype), m;
        memcpy(&m, &absmax.storage[4 * (i / bs)], 4);
        if (!isfinite(x) || !isfinite(m) || m > 1e30f || m < 1e-30f) continue;
        float tol = m * half_gap + (fabsf(x) + fabsf(y)) * (dtype == KBIT_DTYPE_F32 ? 1e-6f : 1e-2f) + 1e-30f;
        if (!(fabsf(x - y) <= tol)) fail("4-bit round trip error above the codebook's bound", "kbit_*_4bit");
      }
      return;
    }
    case 4: {  /* GEMV over random codes */
      int dtype = pick_dtype(r), qt = pick_quant(r);
      bool h1, h2;
      int64_t n_out = pick_count(r, h1) % 97, k_in = pick_count(r, h2) % 301;
      if (h1) n_out = INT64_MAX / 3;
      if (h2) k_in = INT64_MAX / 5;
      int32_t bs = pick_blocksize(r, 32);
      bool ok_sizes = n_out > 0 && k_in >= 0 && !h1 && !h2;
      size_t w = ok_sizes ? (size_t)(n_out * k_in) : 0, es = (dtype >= 0 && dtype <= 2) ? esize(dtype) : 4;
      size_t nb = bs > 0 ? (w + bs - 1) / bs : 0, rows = ok_sizes ? (size_t)n_out : 0;
      Buffer A((ok_sizes ? k_in : 0) * es, pick_null(r)), packed((w + 1) / 2, pick_null(r)),
          absmax(4 * nb, pick_null(r)), bias(rows * es, r.u8() < 128 || pick_null(r)), out(rows * es, pick_null(r));
      fill_values(r, A, dtype);
      fill_bytes(r, packed);
      for (size_t b = 0; b < nb && !absmax.null; ++b) {
        float m = (r.u8() + 1) / 64.0f;
        memcpy(&absmax.storage[4 * b], &m, 4);
      }
      fill_values(r, bias, dtype);
      /* The two paths sum in their own orders: each is within k_in * 2^-24 of sum |A W'| (+ |bias|)
       * of the exact product, and the output rounding to dtype (float32 here: none). */
      const double out_eps = dtype == KBIT_DTYPE_F32 ? 0.0 : dtype == KBIT_DTYPE_F16 ? 1.0 / 2048 : 1.0 / 256;
      auto agree = [&](const std::vector<Buffer>& a, const std::vector<Buffer*>& b) {
        float cb[16];
        codebook4(qt, cb);
        for (size_t j = 0; j < rows; ++j) {
          double mag = bias.null ? 0.0 : fabs(as_float(bias, j, dtype));
          for (int64_t k = 0; k < k_in; ++k) {
            size_t pos = j * (size_t)k_in + (size_t)k;
            uint8_t byte = packed.storage[pos / 2], c = (pos & 1) ? (byte & 15) : (byte >> 4);
            float m;
            memcpy(&m, &absmax.storage[4 * (pos / bs)], 4);
            mag += fabs((double)as_float(A, (size_t)k, dtype)) * fabs((double)cb[c] * m);
          }
          float x = as_float(a[0], j, dtype), y = as_float(*b[0], j, dtype);
          if (!(mag < 1e38) || x == y || (isnan(x) && isnan(y))) continue;  /* near FLT_MAX: any order may overflow */
          double bound = mag * (2.0 * (k_in + 1) * 5.96e-8) + (fabs((double)x) + fabs((double)y)) * out_eps + 1e-30;
          if (!(fabs((double)x - y) <= bound)) {
            fprintf(stderr, "abi_fuzz: gemv row %zu of %lld x %lld: %.9g vs %.9g, bound %.3g\n", j, (long long)n_out,
                    (long long)k_in, x, y, bound);
            return false;
          }
        }
        return true;
      };
      twice("kbit_gemv_4bit", {&out}, [&] {
        return kbit_gemv_4bit(dtype, qt, A.ptr(), packed.ptr(), (float*)absmax.ptr(), bias.ptr(), out.ptr(), n_out,
                              k_in, bs, nullptr);
      }, agree);
      return;
    }
    default: {  /* Adam / AdamW, two steps */
      int dtype = pick_dtype(r);
      int64_t n = pick_count(r, huge);
      size_t cnt = n > 0 && !huge ? (size_t)n : 0, es = (dtype >= 0 && dtype <= 2) ? esize(dtype) : 4;
      size_t nb = (cnt + KBIT_OPTIM8_BLOCKSIZE - 1) / KBIT_OPTIM8_BLOCKSIZE;
      Buffer p(cnt * es, pick_null(r)), g(cnt * es, pick_null(r)), s1(cnt, pick_null(r)), s2(cnt, pick_null(r)),
          a1(4 * nb, pick_null(r)), a2(4 * nb, pick_null(r)), q1(1024, pick_null(r)), q2(1024, pick_null(r));
      for (Buffer* b : {&s1, &s2, &a1, &a2})
        if (!b->storage.empty()) memset(b->storage.data(), 0, b->storage.size());
      fill_values(r, p, dtype);
      fill_codebook(r, q1, true);
      fill_codebook(r, q2, false);
      float beta1 = (r.u8() % 100) / 100.0f, beta2 = 0.9f + (r.u8() % 100) / 1001.0f, eps = 1e-8f;
      float wd = r.u8() < 32 ? (float)(r.u32() % 1000) / 100.0f : 0.0f, lr = (r.u8() + 1) / 1000.0f;
      if (r.u8() >= 250) beta1 = 1.5f;  /* refused */
      int decoupled = r.u8() & 1, step0 = r.u8() < 250 ? 1 : -(int)(r.u8());
      for (int k = 0; k < 2; ++k) {
        fill_values(r, g, dtype);
        int s = twice("kbit_adam_8bit_blockwise", {&p, &s1, &s2, &a1, &a2}, [&] {
          return kbit_adam_8bit_blockwise(dtype, p.ptr(), g.ptr(), s1.ptr(), s2.ptr(), (float*)a1.ptr(),
                                          (float*)a2.ptr(), (float*)q1.ptr(), (float*)q2.ptr(), beta1, beta2, eps, wd,
                                          lr, step0 + k, 1.0f, decoupled, n, nullptr);
        });
        if (s != KBIT_OK) return;
      }
      return;
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Reader r{data, size};
  for (int calls = 0; calls < 8 && !r.done(); ++calls) one_call(r);
  return 0;
}

#ifndef KBIT_LIBFUZZER
namespace {

std::vector<uint8_t> read_file(const std::string& path) {
  std::vector<uint8_t> data;
  FILE* f = fopen(path.c_str(), "rb");
  if (!f) {
    perror(path.c_str());
    exit(2);
  }
  uint8_t buf[4096];
  size_t k;
  while ((k = fread(buf, 1, sizeof buf, f)) > 0) data.insert(data.end(), buf, buf + k);
  fclose(f);
  return data;
}

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = opendir(dir.c_str());
  if (!d) return out;
  while (dirent* e = readdir(d))
    if (e->d_name[0] != '.') out.push_back(dir + "/" + e->d_name);
  closedir(d);
  return out;
}

void mutate(std::vector<uint8_t>& d, uint64_t& s, const std::vector<std::vector<uint8_t>>& corpus) {
  auto rnd = [&s]() {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return s;
  };
  int rounds = 1 + rnd() % 8;
  for (int k = 0; k < rounds; ++k) {
    switch (rnd() % 5) {
      case 0: if (!d.empty()) d[rnd() % d.size()] ^= (uint8_t)(1u << (rnd() % 8)); break;
      case 1: if (!d.empty()) d[rnd() % d.size()] = (uint8_t)rnd(); break;
      case 2: d.insert(d.begin() + (d.empty() ? 0 : rnd() % d.size()), (uint8_t)rnd()); break;
      case 3: if (d.size() > 1) d.erase(d.begin() + rnd() % d.size()); break;
      default: {
        const auto& o = corpus[rnd() % corpus.size()];
        if (!o.empty()) {
          size_t at = rnd() % o.size();
          d.insert(d.end(), o.begin() + at, o.end());
        }
      }
    }
  }
  if (d.size() > 4096) d.resize(4096);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 3 && strcmp(argv[1], "replay") == 0) {
    for (int i = 2; i < argc; ++i) {
      std::vector<uint8_t> d = read_file(argv[i]);
      LLVMFuzzerTestOneInput(d.data(), d.size());
    }
    printf("abi_fuzz: replayed %d inputs\n", argc - 2);
    return 0;
  }
  if (argc >= 4 && strcmp(argv[1], "fuzz") == 0) {
    double seconds = atof(argv[2]);
    std::vector<std::vector<uint8_t>> corpus;
    for (const auto& f : list_dir(argv[3])) corpus.push_back(read_file(f));
    if (corpus.empty()) corpus.push_back(std::vector<uint8_t>(64, 0));
    uint64_t s = argc >= 5 ? strtoull(argv[4], nullptr, 10) | 1 : (uint64_t)time(nullptr) | 1;
    time_t t0 = time(nullptr);
    long execs = 0;
    while (difftime(time(nullptr), t0) < seconds) {
      std::vector<uint8_t> d = corpus[s % corpus.size()];
      mutate(d, s, corpus);
      /* written before it runs, removed after: a crashing input is left behind */
      FILE* f = fopen("crash-input", "wb");
      if (f) {
        fwrite(d.data(), 1, d.size(), f);
        fclose(f);
      }
      alarm(10); /* a hang is a finding too: SIGALRM ends the process, the input stays in crash-input */
      LLVMFuzzerTestOneInput(d.data(), d.size());
      alarm(0);
      ++execs;
    }
    remove("crash-input");
    printf("abi_fuzz: %ld executions in %.0f s, 0 failures\n", execs, seconds);
    return 0;
  }
  fprintf(stderr, "usage: %s replay FILE... | fuzz SECONDS CORPUS_DIR [SEED]\n", argv[0]);
  return 2;
}
#endif
