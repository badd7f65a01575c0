// Pillow-exact bicubic resize of 8-bit RGB, and the normalisation to the model input.
//
// Written from the algorithm of Pillow's libImaging/Resample.c (ImagingResampleInner with the
// 8-bpc passes), so that the C++ input tensor equals the Python one: the same filter evaluated
// in double precision in the same order, the same rounding of the coefficients to 22-bit fixed
// point, the same integer accumulation and clipping, and the same 8-bit intermediate image
// between the horizontal and the vertical pass. No library offers Pillow's exact arithmetic
// (OpenCV's and libvips' bicubic differ by several grey levels), hence our own code. This file
// is compiled with -ffp-contract=off so no fused multiply-add changes a coefficient.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cops/errors.hpp"
#include "cops/image.hpp"

namespace cops {
namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;  // 8 bits of result, 2 of headroom: 22
constexpr double kSupport = 2.0;            // support of the a = -0.5 cubic

double cubic(double x) {
  const double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

// For each output index along one axis: the first input index, the number of taps, and the
// fixed-point weights (ksize per output index).
struct Taps {
  int ksize = 0;
  std::vector<int> first;
  std::vector<int> count;
  std::vector<std::int32_t> weights;
};

Taps make_taps(int in_size, int out_size) {
  // Pillow passes the box edges as float; (in1 - in0) is computed in float, then widened.
  const float in0 = 0.0f;
  const float in1 = static_cast<float>(in_size);
  const double scale = static_cast<double>(in1 - in0) / out_size;
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = kSupport * filterscale;
  Taps taps;
  taps.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  taps.first.resize(out_size);
  taps.count.resize(out_size);
  taps.weights.assign(static_cast<size_t>(out_size) * taps.ksize, 0);
  std::vector<double> k(taps.ksize);
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = in0 + (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      const double w = cubic((x + xmin - center + 0.5) * ss);
      k[x] = w;
      ww += w;
    }
    for (int x = 0; x < xmax; ++x) {
      if (ww != 0.0) k[x] /= ww;
    }
    std::int32_t* out = &taps.weights[static_cast<size_t>(xx) * taps.ksize];
    for (int x = 0; x < xmax; ++x) {
      const double scaled = k[x] * (1 << kPrecisionBits);
      out[x] = static_cast<std::int32_t>(k[x] < 0 ? -0.5 + scaled : 0.5 + scaled);
    }
    taps.first[xx] = xmin;
    taps.count[xx] = xmax;
  }
  return taps;
}

inline std::uint8_t clip8(std::int32_t acc) {
  // Arithmetic shift (floor), then clamp: Pillow's clip8 lookup table.
  const std::int32_t v = acc >> kPrecisionBits;
  return static_cast<std::uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// Horizontal pass over rows [row0, row0 + rows) of `in` (width in_w) into `out` (width out_w).
void horizontal(const std::uint8_t* in, int in_w, int row0, int rows, const Taps& taps,
                int out_w, std::uint8_t* out) {
  for (int y = 0; y < rows; ++y) {
    const std::uint8_t* src = in + static_cast<size_t>(y + row0) * in_w * 3;
    std::uint8_t* dst = out + static_cast<size_t>(y) * out_w * 3;
    for (int xx = 0; xx < out_w; ++xx) {
      const std::int32_t* k = &taps.weights[static_cast<size_t>(xx) * taps.ksize];
      const std::uint8_t* p = src + static_cast<size_t>(taps.first[xx]) * 3;
      std::int32_t s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
      for (int x = 0; x < taps.count[xx]; ++x, p += 3) {
        s0 += p[0] * k[x];
        s1 += p[1] * k[x];
        s2 += p[2] * k[x];
      }
      dst[xx * 3 + 0] = clip8(s0);
      dst[xx * 3 + 1] = clip8(s1);
      dst[xx * 3 + 2] = clip8(s2);
    }
  }
}

// Vertical pass: `first` indices are relative to the first row of `in`.
void vertical(const std::uint8_t* in, int width, const Taps& taps, const std::vector<int>& first,
              int out_h, std::uint8_t* out) {
  const size_t row = static_cast<size_t>(width) * 3;
  std::vector<std::int32_t> acc(row);
  for (int yy = 0; yy < out_h; ++yy) {
    const std::int32_t* k = &taps.weights[static_cast<size_t>(yy) * taps.ksize];
    const std::uint8_t* base = in + static_cast<size_t>(first[yy]) * row;
    std::fill(acc.begin(), acc.end(), 1 << (kPrecisionBits - 1));
    for (int y = 0; y < taps.count[yy]; ++y) {  // row by row: sequential memory access
      const std::uint8_t* src = base + y * row;
      const std::int32_t w = k[y];
      for (size_t c = 0; c < row; ++c) acc[c] += src[c] * w;
    }
    std::uint8_t* dst = out + static_cast<size_t>(yy) * row;
    for (size_t c = 0; c < row; ++c) dst[c] = clip8(acc[c]);
  }
}

}  // namespace

RgbImage resize_bicubic(const RgbImage& image, int out_width, int out_height) {
  if (out_width < 1 || out_height < 1 || image.width < 1 || image.height < 1) {
    throw ConfigError("cannot resize a " + std::to_string(image.width) + "x" +
                      std::to_string(image.height) + " image to " + std::to_string(out_width) +
                      "x" + std::to_string(out_height) + "; valid: sizes >= 1.");
  }
  if (image.width == out_width && image.height == out_height) return image;
  const bool need_h = out_width != image.width;
  const bool need_v = out_height != image.height;
  // Pass order: horizontal then vertical, except when the height shrinks by more than twice as
  // many pixels as the width does (Pillow 13, python-pillow/Pillow#9549: vertical first). The
  // 8-bit intermediate image makes the order visible in the result. The rule was confirmed
  // against Pillow on every size pair tests/edge/test_cpp.py tries.
  const bool vertical_first = need_h && need_v && out_height < image.height &&
                              (image.height - out_height) > 2 * (image.width - out_width);
  const Taps vtaps = make_taps(image.height, out_height);
  if (vertical_first) {
    RgbImage tmp;
    tmp.width = image.width;
    tmp.height = out_height;
    tmp.data.resize(static_cast<size_t>(tmp.width) * tmp.height * 3);
    vertical(image.data.data(), image.width, vtaps, vtaps.first, out_height, tmp.data.data());
    RgbImage out;
    out.width = out_width;
    out.height = out_height;
    out.data.resize(static_cast<size_t>(out.width) * out.height * 3);
    horizontal(tmp.data.data(), tmp.width, 0, out_height, make_taps(image.width, out_width),
               out_width, out.data.data());
    return out;
  }
  // Rows of the input that the vertical pass reads.
  const int row_first = vtaps.first.front();
  const int row_last = vtaps.first.back() + vtaps.count.back();
  std::vector<int> vfirst = vtaps.first;

  if (!need_h) {  // vertical only, over the whole input
    RgbImage out;
    out.width = image.width;
    out.height = out_height;
    out.data.resize(static_cast<size_t>(out.width) * out.height * 3);
    vertical(image.data.data(), image.width, vtaps, vtaps.first, out_height, out.data.data());
    return out;
  }
  const Taps htaps = make_taps(image.width, out_width);
  RgbImage tmp;  // the horizontal pass over the rows the vertical pass reads
  tmp.width = out_width;
  tmp.height = need_v ? row_last - row_first : image.height;
  tmp.data.resize(static_cast<size_t>(tmp.width) * tmp.height * 3);
  horizontal(image.data.data(), image.width, need_v ? row_first : 0, tmp.height, htaps, out_width,
             tmp.data.data());
  if (!need_v) return tmp;
  for (auto& f : vfirst) f -= row_first;
  RgbImage out;
  out.width = out_width;
  out.height = out_height;
  out.data.resize(static_cast<size_t>(out.width) * out.height * 3);
  vertical(tmp.data.data(), tmp.width, vtaps, vfirst, out_height, out.data.data());
  return out;
}

namespace {

// Pillow's precompute_coeffs with the bilinear (triangle) filter, coefficients kept in double
// (the 32-bit float path of libImaging/Resample.c does not round them to fixed point).
struct FloatTaps {
  int ksize = 0;
  std::vector<int> first;
  std::vector<int> count;
  std::vector<double> weights;
};

FloatTaps make_bilinear_taps(int in_size, int out_size) {
  const float in0 = 0.0f;
  const float in1 = static_cast<float>(in_size);
  const double scale = static_cast<double>(in1 - in0) / out_size;
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = 1.0 * filterscale;
  FloatTaps taps;
  taps.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  taps.first.resize(out_size);
  taps.count.resize(out_size);
  taps.weights.assign(static_cast<size_t>(out_size) * taps.ksize, 0.0);
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = in0 + (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double* k = &taps.weights[static_cast<size_t>(xx) * taps.ksize];
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      double t = (x + xmin - center + 0.5) * ss;
      if (t < 0.0) t = -t;
      const double w = t < 1.0 ? 1.0 - t : 0.0;
      k[x] = w;
      ww += w;
    }
    for (int x = 0; x < xmax; ++x) {
      if (ww != 0.0) k[x] /= ww;
    }
    taps.first[xx] = xmin;
    taps.count[xx] = xmax;
  }
  return taps;
}

// Horizontal pass of a float image (rows [row0, row0 + rows) of `in`).
std::vector<float> horizontal_f(const std::vector<float>& in, int in_w, int row0, int rows,
                                const FloatTaps& taps, int out_w) {
  std::vector<float> out(static_cast<size_t>(rows) * out_w);
  for (int y = 0; y < rows; ++y) {
    const float* src = in.data() + static_cast<size_t>(y + row0) * in_w;
    for (int xx = 0; xx < out_w; ++xx) {
      const double* k = &taps.weights[static_cast<size_t>(xx) * taps.ksize];
      double ss = 0.0;
      for (int x = 0; x < taps.count[xx]; ++x) ss += src[x + taps.first[xx]] * k[x];
      out[static_cast<size_t>(y) * out_w + xx] = static_cast<float>(ss);
    }
  }
  return out;
}

// Vertical pass; `first` indices are relative to the first row of `in`.
std::vector<float> vertical_f(const std::vector<float>& in, int width, const FloatTaps& taps,
                              const std::vector<int>& first, int out_h) {
  std::vector<float> out(static_cast<size_t>(out_h) * width);
  for (int yy = 0; yy < out_h; ++yy) {
    const double* k = &taps.weights[static_cast<size_t>(yy) * taps.ksize];
    for (int xx = 0; xx < width; ++xx) {
      double ss = 0.0;
      for (int y = 0; y < taps.count[yy]; ++y) {
        ss += in[static_cast<size_t>(y + first[yy]) * width + xx] * k[y];
      }
      out[static_cast<size_t>(yy) * width + xx] = static_cast<float>(ss);
    }
  }
  return out;
}

}  // namespace

std::vector<float> resize_map_bilinear(const std::vector<float>& map, int width, int height,
                                       int out_width, int out_height) {
  if (out_width < 1 || out_height < 1 || width < 1 || height < 1 ||
      map.size() != static_cast<size_t>(width) * height) {
    throw ConfigError("cannot resize a " + std::to_string(width) + "x" + std::to_string(height) +
                      " map of " + std::to_string(map.size()) + " values to " +
                      std::to_string(out_width) + "x" + std::to_string(out_height) +
                      "; valid: sizes >= 1 and width * height values.");
  }
  if (width == out_width && height == out_height) return map;
  const bool need_h = out_width != width;
  const bool need_v = out_height != height;
  // The pass order of resize_bicubic (Pillow 13 chooses it the same way for every mode).
  const bool vertical_first =
      need_h && need_v && out_height < height && (height - out_height) > 2 * (width - out_width);
  const FloatTaps vtaps = make_bilinear_taps(height, out_height);
  if (vertical_first) {
    const auto tmp = vertical_f(map, width, vtaps, vtaps.first, out_height);
    return horizontal_f(tmp, width, 0, out_height, make_bilinear_taps(width, out_width),
                        out_width);
  }
  if (!need_h) return vertical_f(map, width, vtaps, vtaps.first, out_height);
  const int row_first = vtaps.first.front();
  const int row_last = vtaps.first.back() + vtaps.count.back();
  const FloatTaps htaps = make_bilinear_taps(width, out_width);
  const int rows = need_v ? row_last - row_first : height;
  const auto tmp = horizontal_f(map, width, need_v ? row_first : 0, rows, htaps, out_width);
  if (!need_v) return tmp;
  std::vector<int> vfirst = vtaps.first;
  for (auto& f : vfirst) f -= row_first;
  return vertical_f(tmp, out_width, vtaps, vfirst, out_height);
}

void preprocess_into(const RgbImage& image, int size, const std::array<double, 3>& mean,
                     const std::array<double, 3>& std, float* out) {
  const RgbImage resized = resize_bicubic(image, size, size);
  const size_t plane = static_cast<size_t>(size) * size;
  for (int c = 0; c < 3; ++c) {
    // float32 arithmetic in the order numpy does it: x / 255, then (x - mean) / std.
    const float m = static_cast<float>(mean[c]);
    const float s = static_cast<float>(std[c]);
    float* dst = out + c * plane;
    for (size_t i = 0; i < plane; ++i) {
      const float x = static_cast<float>(resized.data[i * 3 + c]) / 255.0f;
      dst[i] = (x - m) / s;
    }
  }
}

}  // namespace cops
