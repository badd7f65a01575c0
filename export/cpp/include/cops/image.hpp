// cops/image.hpp: reading images as 8-bit RGB with the Python runtime's rules, and the
// preprocessing that turns one into the model's input tensor.
//
// Rules (cops_deploy/imaging/decode.py), applied with the libraries Pillow itself uses
// (libjpeg-turbo, libpng):
// - JPEG and PNG files are read (by their first bytes, whatever the suffix); other formats are
//   refused with an ImageError (the Python runtime also reads BMP, TIFF, WebP, GIF: convert
//   those to PNG for the C++ library).
// - EXIF orientation (JPEG APP1 "Exif", PNG eXIf chunk or "Raw profile type exif" text; else an
//   XMP tiff:Orientation) is applied as PIL.ImageOps.exif_transpose does.
// - Grey (1, 2, 4, 8 bit) is repeated over three channels; alpha (RGBA, grey+alpha, palette
//   transparency) is dropped, colours kept as stored; palettes are expanded; 16-bit samples are
//   scaled with `value >> 8`; CMYK JPEG is converted as Pillow's convert('RGB') does.
// - The whole file is decoded: a truncated or corrupt file is refused (PNG checksums too).
// - Images over kMaxPixels pixels are refused (Pillow's decompression-bomb limit).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace cops {

// Pillow refuses images over 2 * PIL.Image.MAX_IMAGE_PIXELS pixels; so does this library.
inline constexpr std::uint64_t kMaxPixels = 2ull * 89478485ull;

// An 8-bit RGB image, rows top to bottom, pixels interleaved R, G, B (HWC).
struct RgbImage {
  int width = 0;
  int height = 0;
  std::vector<std::uint8_t> data;  // height * width * 3 bytes
};

// A caller's pixel buffer, e.g. a camera frame; nothing is copied until it is used.
// channels: 1 (grey, repeated), 3 (RGB) or 4 (RGBA, alpha dropped), 8 bits each.
// row_stride: bytes from one row to the next; 0 means width * channels (packed rows).
struct ImageView {
  const std::uint8_t* data = nullptr;
  int width = 0;
  int height = 0;
  int channels = 3;
  std::size_t row_stride = 0;
};

// Read a JPEG or PNG file as RGB (see the rules above). Throws ImageError naming the file.
RgbImage load_image(const std::filesystem::path& path);

// Decode an in-memory JPEG or PNG file; `what` names it in messages. Throws ImageError.
RgbImage decode_image(const std::uint8_t* bytes, std::size_t size, const std::string& what);

// Copy a caller's buffer as RGB (grey repeated, alpha dropped). Throws ConfigError on a bad
// layout (null data, non-positive size, channels not 1/3/4, stride too small).
RgbImage to_rgb(const ImageView& view);

// Apply an EXIF orientation value as PIL.ImageOps.exif_transpose does (2..8 transpose the
// image; any other value leaves it as is).
RgbImage apply_orientation(const RgbImage& image, int orientation);

// The Orientation tag (0x0112) of IFD0 of an EXIF block ("Exif\0\0" + TIFF data, or the TIFF
// data alone); 0 when absent or unreadable.
int exif_orientation(const std::uint8_t* exif, std::size_t size);

// Resize RGB to (out_width, out_height) exactly as Pillow's Image.resize(..., BICUBIC) does for
// an 'RGB' image: two separable passes (horizontal, then vertical) with the a = -0.5 cubic
// filter, its support widened by the scale when shrinking (antialiasing), 22-bit fixed-point
// coefficients and an 8-bit clipped intermediate image. Equal sizes return a copy.
RgbImage resize_bicubic(const RgbImage& image, int out_width, int out_height);

// Resize a row-major float map (width x height) to (out_width, out_height) exactly as Pillow's
// Image.fromarray(map, 'F').resize(..., BILINEAR) does, as the Python runtime's resize_map
// (the anomaly map at the original image size). Equal sizes return a copy.
std::vector<float> resize_map_bilinear(const std::vector<float>& map, int width, int height,
                                       int out_width, int out_height);

// The model input of one image: resize to size x size (bicubic, as above), scale to [0, 1]
// (value / 255 in float32) and normalise ((x - mean) / std, float32), channels first: a
// (3, size, size) float array written to `out` (3 * size * size floats).
void preprocess_into(const RgbImage& image, int size, const std::array<double, 3>& mean,
                     const std::array<double, 3>& std, float* out);

}  // namespace cops
