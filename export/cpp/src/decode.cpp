// Image decoding with the Python runtime's rules (see cops/image.hpp): libjpeg-turbo and libpng,
// as Pillow uses them, EXIF orientation through libexif.
//
// libjpeg and libpng report fatal errors through longjmp; each decoder keeps its setjmp in a
// function whose own locals are trivially destructible (the buffers live in the caller's
// frame), so no C++ destructor is skipped.
#include <cstdio>  // before jpeglib.h, which uses FILE and size_t

#include <jerror.h>
#include <jpeglib.h>
#include <libexif/exif-data.h>
#include <png.h>

#include <algorithm>
#include <csetjmp>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "cops/errors.hpp"
#include "cops/image.hpp"

namespace cops {
namespace {

namespace fs = std::filesystem;

const char* const kCorruptFix = "Fix: re-copy or re-export the image.";
const char kExifHeader[] = {'E', 'x', 'i', 'f', 0, 0};
const char kXmpJpegHeader[] = "http://ns.adobe.com/xap/1.0/";  // followed by a NUL

[[noreturn]] void corrupt(const std::string& what, const std::string& detail) {
  throw ImageError("cannot read " + what + ": the file is truncated or corrupt (" + detail +
                   "). Valid: a complete image file. " + kCorruptFix);
}

void check_pixels(const std::string& what, std::uint64_t width, std::uint64_t height) {
  if (width * height > kMaxPixels) {
    throw ImageError("cannot read " + what + ": " + std::to_string(width) + "x" +
                     std::to_string(height) + " pixels exceeds the limit of " +
                     std::to_string(kMaxPixels) +
                     " (decompression bomb?). Fix: downscale the image.");
  }
}

// Orientation from XMP as Pillow's Image.getexif reads it: the first 'tiff:Orientation="N"' or
// 'tiff:Orientation>N'; 1 when absent.
int xmp_orientation(const std::string& xmp) {
  const std::string tag = "tiff:Orientation";
  for (size_t at = xmp.find(tag); at != std::string::npos; at = xmp.find(tag, at + 1)) {
    size_t p = at + tag.size();
    if (xmp.compare(p, 2, "=\"") == 0) {
      p += 2;
    } else if (xmp.compare(p, 1, ">") == 0) {
      p += 1;
    } else {
      continue;
    }
    if (p < xmp.size() && xmp[p] >= '0' && xmp[p] <= '9') return xmp[p] - '0';
  }
  return 1;
}

// What exif_transpose reads: the EXIF block if there is one (its Orientation, else 1 unless
// XMP names one), else XMP.
struct Metadata {
  std::vector<std::uint8_t> exif;
  bool has_exif = false;
  std::string xmp;

  int orientation() const {
    if (has_exif) {
      const int o = exif_orientation(exif.data(), exif.size());
      if (o != 0) return o;
    }
    return xmp_orientation(xmp);
  }
};

// ---------------------------------------------------------------------------------------------
// JPEG (libjpeg-turbo)

struct JpegErrors {
  jpeg_error_mgr mgr;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
  bool truncated;
};

void jpeg_fail(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<JpegErrors*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  std::longjmp(err->jump, 1);
}

void jpeg_warn(j_common_ptr cinfo, int level) {
  // Pillow refuses a file that ends early (libjpeg pads it with a fake EOI and warns); other
  // warnings (extraneous bytes, ...) are ignored by Pillow as well.
  auto* err = reinterpret_cast<JpegErrors*>(cinfo->err);
  if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) err->truncated = true;
}

struct JpegJob {
  const std::uint8_t* bytes;
  std::size_t size;
  std::vector<std::uint8_t> pixels;  // decoded samples, components interleaved
  std::vector<std::vector<std::uint8_t>> app1;  // APP1 payloads in file order
  int width, height, components;
  bool cmyk;
  JpegErrors errors;
};

// Returns false after a libjpeg error (message in job->errors.message).
bool run_jpeg(JpegJob* job) {
  jpeg_decompress_struct cinfo;
  cinfo.err = jpeg_std_error(&job->errors.mgr);
  job->errors.mgr.error_exit = jpeg_fail;
  job->errors.mgr.emit_message = jpeg_warn;
  job->errors.truncated = false;
  if (setjmp(job->errors.jump)) {
    jpeg_destroy_decompress(&cinfo);
    return false;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, job->bytes, static_cast<unsigned long>(job->size));
  jpeg_save_markers(&cinfo, JPEG_APP0 + 1, 0xFFFF);
  jpeg_read_header(&cinfo, TRUE);
  for (jpeg_saved_marker_ptr m = cinfo.marker_list; m != nullptr; m = m->next) {
    job->app1.emplace_back(m->data, m->data + m->data_length);
  }
  job->cmyk = cinfo.num_components == 4;
  if (cinfo.num_components == 1) {
    cinfo.out_color_space = JCS_GRAYSCALE;
  } else if (job->cmyk) {
    cinfo.out_color_space = JCS_CMYK;  // YCCK is converted to CMYK by libjpeg
  } else {
    cinfo.out_color_space = JCS_RGB;
  }
  jpeg_start_decompress(&cinfo);
  job->width = static_cast<int>(cinfo.output_width);
  job->height = static_cast<int>(cinfo.output_height);
  job->components = cinfo.output_components;
  if (static_cast<std::uint64_t>(job->width) * job->height > kMaxPixels) {
    jpeg_destroy_decompress(&cinfo);
    return true;  // the caller refuses it by size
  }
  const size_t row = static_cast<size_t>(job->width) * job->components;
  job->pixels.resize(row * job->height);
  while (cinfo.output_scanline < cinfo.output_height) {
    JSAMPROW line = job->pixels.data() + row * cinfo.output_scanline;
    jpeg_read_scanlines(&cinfo, &line, 1);
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return true;
}

RgbImage decode_jpeg(const std::uint8_t* bytes, std::size_t size, const std::string& what,
                     Metadata* meta) {
  JpegJob job{};
  job.bytes = bytes;
  job.size = size;
  if (!run_jpeg(&job)) corrupt(what, std::string("libjpeg: ") + job.errors.message);
  check_pixels(what, job.width, job.height);
  if (job.errors.truncated) corrupt(what, "libjpeg: premature end of JPEG file");
  if (job.components != 1 && job.components != 3 && job.components != 4) {
    throw ImageError("cannot read " + what + ": a JPEG with " + std::to_string(job.components) +
                     " components; valid: 1 (grey), 3 (colour) or 4 (CMYK). Fix: convert the "
                     "image to RGB.");
  }
  // Pillow keeps the first "Exif" APP1 and appends the TIFF data of later ones; the last XMP.
  for (const auto& seg : job.app1) {
    if (seg.size() >= 6 && std::memcmp(seg.data(), kExifHeader, 6) == 0) {
      if (!meta->has_exif) {
        meta->exif = seg;
        meta->has_exif = true;
      } else {
        meta->exif.insert(meta->exif.end(), seg.begin() + 6, seg.end());
      }
    } else if (seg.size() > sizeof(kXmpJpegHeader) &&
               std::memcmp(seg.data(), kXmpJpegHeader, sizeof(kXmpJpegHeader)) == 0) {
      meta->xmp.assign(seg.begin() + sizeof(kXmpJpegHeader), seg.end());
    }
  }
  RgbImage out;
  out.width = job.width;
  out.height = job.height;
  const size_t n = static_cast<size_t>(job.width) * job.height;
  out.data.resize(n * 3);
  const std::uint8_t* p = job.pixels.data();
  for (size_t i = 0; i < n; ++i) {
    std::uint8_t* q = &out.data[i * 3];
    if (job.components == 1) {
      q[0] = q[1] = q[2] = p[i];
    } else if (job.components == 3) {
      std::memcpy(q, p + i * 3, 3);
    } else {
      // Pillow reads CMYK JPEG as Adobe-inverted ("CMYK;I"), then converts with
      // r = 255 - k - c * (255 - k) / 255 (its MULDIV255 rounding).
      const std::uint8_t* s = p + i * 4;
      const int nk = s[3];  // 255 - (255 - stored k)
      for (int c = 0; c < 3; ++c) {
        const int tmp = (255 - s[c]) * nk + 128;
        const int v = nk - (((tmp >> 8) + tmp) >> 8);
        q[c] = static_cast<std::uint8_t>(std::clamp(v, 0, 255));
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// PNG (libpng)

struct PngJob {
  const std::uint8_t* bytes;
  std::size_t size;
  std::size_t offset;
  std::vector<std::uint8_t> pixels;
  std::vector<png_bytep> rows;
  std::vector<std::uint8_t> exif;
  bool has_exif;
  std::string xmp;       // iTXt/tEXt "XML:com.adobe.xmp"
  std::string raw_exif;  // tEXt/zTXt "Raw profile type exif"
  std::uint32_t width, height;
  int channels;
  char message[256];
};

void png_read_memory(png_structp png, png_bytep out, png_size_t length) {
  auto* job = static_cast<PngJob*>(png_get_io_ptr(png));
  if (length > job->size - job->offset) png_error(png, "unexpected end of file");
  std::memcpy(out, job->bytes + job->offset, length);
  job->offset += length;
}

void png_fail(png_structp png, png_const_charp message) {
  auto* job = static_cast<PngJob*>(png_get_error_ptr(png));
  std::snprintf(job->message, sizeof(job->message), "%s", message);
  png_longjmp(png, 1);
}

void png_warn(png_structp, png_const_charp) {}

void png_collect(png_structp png, png_infop info, PngJob* job) {
  png_bytep exif = nullptr;
  png_uint_32 exif_size = 0;
  if (!job->has_exif && png_get_eXIf_1(png, info, &exif_size, &exif) != 0 && exif != nullptr) {
    job->exif.assign(kExifHeader, kExifHeader + 6);  // Pillow prefixes the chunk with the header
    job->exif.insert(job->exif.end(), exif, exif + exif_size);
    job->has_exif = true;
  }
  png_textp text = nullptr;
  int count = 0;
  png_get_text(png, info, &text, &count);
  for (int i = 0; i < count; ++i) {
    const std::string key = text[i].key;
    const size_t n = text[i].compression > 0 ? text[i].itxt_length : text[i].text_length;
    const std::string value(text[i].text, text[i].text + n);
    if (key == "XML:com.adobe.xmp" && job->xmp.empty()) job->xmp = value;
    if (key == "Raw profile type exif" && job->raw_exif.empty()) job->raw_exif = value;
  }
}

bool run_png(PngJob* job) {
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, job, png_fail, png_warn);
  if (png == nullptr) {
    std::snprintf(job->message, sizeof(job->message), "libpng could not start");
    return false;
  }
  png_infop info = png_create_info_struct(png);
  png_infop end = png_create_info_struct(png);
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, &info, &end);
    return false;
  }
  if (info == nullptr || end == nullptr) png_error(png, "out of memory");
  png_set_read_fn(png, job, png_read_memory);
  // Pillow's verify() refuses any bad chunk checksum: so do we, critical or ancillary.
  png_set_crc_action(png, PNG_CRC_ERROR_QUIT, PNG_CRC_ERROR_QUIT);
  png_set_user_limits(png, 0x7fffffff, 0x7fffffff);
  png_read_info(png, info);
  png_uint_32 width = 0, height = 0;
  int depth = 0, color = 0;
  png_get_IHDR(png, info, &width, &height, &depth, &color, nullptr, nullptr, nullptr);
  job->width = width;
  job->height = height;
  if (static_cast<std::uint64_t>(width) * height > kMaxPixels) {
    png_destroy_read_struct(&png, &info, &end);
    return true;  // the caller refuses it by size
  }
  if (color == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);  // palette colours, no alpha
  if (color == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(png);
  if (depth == 16) png_set_strip_16(png);  // keeps the high byte: value >> 8
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  job->channels = png_get_channels(png, info);
  const size_t row = png_get_rowbytes(png, info);
  job->pixels.resize(row * height);
  job->rows.resize(height);
  for (png_uint_32 y = 0; y < height; ++y) job->rows[y] = job->pixels.data() + row * y;
  png_read_image(png, job->rows.data());
  png_read_end(png, end);  // reads to IEND: checksums of every chunk, trailing metadata
  png_collect(png, info, job);
  png_collect(png, end, job);
  png_destroy_read_struct(&png, &info, &end);
  return true;
}

// bytes.fromhex of the hex lines of a "Raw profile type exif" text (Pillow skips 3 lines).
std::vector<std::uint8_t> raw_profile_bytes(const std::string& text) {
  size_t at = 0;
  for (int line = 0; line < 3 && at != std::string::npos; ++line) {
    at = text.find('\n', at);
    if (at != std::string::npos) ++at;
  }
  std::vector<std::uint8_t> out;
  if (at == std::string::npos) return out;
  int high = -1;
  for (size_t i = at; i < text.size(); ++i) {
    const char c = text[i];
    if (std::isspace(static_cast<unsigned char>(c))) continue;
    const int v = std::isdigit(static_cast<unsigned char>(c)) ? c - '0'
                  : (c >= 'a' && c <= 'f')                   ? c - 'a' + 10
                  : (c >= 'A' && c <= 'F')                   ? c - 'A' + 10
                                                             : -1;
    if (v < 0) return {};
    if (high < 0) {
      high = v;
    } else {
      out.push_back(static_cast<std::uint8_t>(high * 16 + v));
      high = -1;
    }
  }
  return out;
}

RgbImage decode_png(const std::uint8_t* bytes, std::size_t size, const std::string& what,
                    Metadata* meta) {
  PngJob job{};
  job.bytes = bytes;
  job.size = size;
  if (!run_png(&job)) corrupt(what, std::string("libpng: ") + job.message);
  check_pixels(what, job.width, job.height);
  if (job.has_exif) {
    meta->exif = job.exif;
    meta->has_exif = true;
  } else if (!job.raw_exif.empty()) {
    meta->exif = raw_profile_bytes(job.raw_exif);
    meta->has_exif = true;
  }
  meta->xmp = job.xmp;
  RgbImage out;
  out.width = static_cast<int>(job.width);
  out.height = static_cast<int>(job.height);
  const size_t n = static_cast<size_t>(job.width) * job.height;
  out.data.resize(n * 3);
  const int ch = job.channels;  // 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA
  for (size_t i = 0; i < n; ++i) {
    const std::uint8_t* p = &job.pixels[i * ch];
    std::uint8_t* q = &out.data[i * 3];
    if (ch <= 2) {
      q[0] = q[1] = q[2] = p[0];
    } else {
      q[0] = p[0];
      q[1] = p[1];
      q[2] = p[2];
    }
  }
  return out;
}

}  // namespace

int exif_orientation(const std::uint8_t* exif, std::size_t size) {
  // libexif rather than a hand-written TIFF walk: it handles both byte orders, IFD offsets and
  // malformed blocks with bounds checks. The "Exif\0\0" header is what it looks for first.
  std::vector<std::uint8_t> block;
  if (size < 6 || std::memcmp(exif, kExifHeader, 6) != 0) {
    block.assign(kExifHeader, kExifHeader + 6);
  }
  block.insert(block.end(), exif, exif + size);
  std::unique_ptr<ExifData, decltype(&exif_data_unref)> data(exif_data_new(), exif_data_unref);
  if (!data) return 0;
  // Read the block as it is: no tags added or "fixed" to follow the specification.
  exif_data_unset_option(data.get(), EXIF_DATA_OPTION_FOLLOW_SPECIFICATION);
  exif_data_load_data(data.get(), block.data(), static_cast<unsigned int>(block.size()));
  ExifEntry* entry = exif_content_get_entry(data->ifd[EXIF_IFD_0], EXIF_TAG_ORIENTATION);
  if (entry == nullptr || entry->components < 1 || entry->data == nullptr) return 0;
  const ExifByteOrder order = exif_data_get_byte_order(data.get());
  switch (entry->format) {
    case EXIF_FORMAT_SHORT:
      return entry->size >= 2 ? exif_get_short(entry->data, order) : 0;
    case EXIF_FORMAT_LONG:
      return entry->size >= 4 ? static_cast<int>(exif_get_long(entry->data, order)) : 0;
    case EXIF_FORMAT_BYTE:
      return entry->data[0];
    default:
      return 0;
  }
}

RgbImage apply_orientation(const RgbImage& image, int orientation) {
  if (orientation < 2 || orientation > 8) return image;
  const int w = image.width, h = image.height;
  const bool swap = orientation >= 5;  // TRANSPOSE, ROTATE_270, TRANSVERSE, ROTATE_90
  RgbImage out;
  out.width = swap ? h : w;
  out.height = swap ? w : h;
  out.data.resize(image.data.size());
  for (int y = 0; y < out.height; ++y) {
    for (int x = 0; x < out.width; ++x) {
      int sx = x, sy = y;  // source pixel of output (x, y), as Pillow's Image.transpose
      switch (orientation) {
        case 2: sx = w - 1 - x; break;                         // FLIP_LEFT_RIGHT
        case 3: sx = w - 1 - x; sy = h - 1 - y; break;         // ROTATE_180
        case 4: sy = h - 1 - y; break;                         // FLIP_TOP_BOTTOM
        case 5: sx = y; sy = x; break;                         // TRANSPOSE
        case 6: sx = y; sy = h - 1 - x; break;                 // ROTATE_270
        case 7: sx = w - 1 - y; sy = h - 1 - x; break;         // TRANSVERSE
        case 8: sx = w - 1 - y; sy = x; break;                 // ROTATE_90
      }
      std::memcpy(&out.data[(static_cast<size_t>(y) * out.width + x) * 3],
                  &image.data[(static_cast<size_t>(sy) * w + sx) * 3], 3);
    }
  }
  return out;
}

RgbImage decode_image(const std::uint8_t* bytes, std::size_t size, const std::string& what) {
  static const std::uint8_t png_magic[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  Metadata meta;
  RgbImage image;
  if (size >= 3 && bytes[0] == 0xFF && bytes[1] == 0xD8 && bytes[2] == 0xFF) {
    image = decode_jpeg(bytes, size, what, &meta);
  } else if (size >= 8 && std::memcmp(bytes, png_magic, 8) == 0) {
    image = decode_png(bytes, size, what, &meta);
  } else {
    throw ImageError("cannot read " + what +
                     ": not a JPEG or PNG file (by its first bytes). Valid: JPEG or PNG (the C++ "
                     "library reads those two; the Python runtime also reads BMP, TIFF, WebP). "
                     "Fix: convert the image to PNG.");
  }
  return apply_orientation(image, meta.orientation());
}

RgbImage load_image(const fs::path& path) {
  const std::string what = "image '" + path.string() + "'";
  std::error_code ec;
  if (!fs::exists(path, ec)) {
    throw ImageError("cannot read " + what +
                     ": no such file. Fix: check the path (relative paths start from the "
                     "working directory).");
  }
  if (fs::is_directory(path, ec)) {
    throw ImageError("cannot read " + what +
                     ": it is a folder, not an image file. Fix: pass the image files in it.");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw ImageError("cannot read " + what +
                     ": permission denied or unreadable. Fix: make the file readable by this "
                     "process.");
  }
  const std::vector<std::uint8_t> bytes((std::istreambuf_iterator<char>(in)),
                                        std::istreambuf_iterator<char>());
  if (bytes.empty()) {
    throw ImageError("cannot read " + what + ": the file is empty (0 bytes). " + kCorruptFix);
  }
  return decode_image(bytes.data(), bytes.size(), what);
}

RgbImage to_rgb(const ImageView& view) {
  const std::string layout = "image buffer " + std::to_string(view.width) + "x" +
                             std::to_string(view.height) + " with " +
                             std::to_string(view.channels) + " channel(s)";
  if (view.data == nullptr || view.width < 1 || view.height < 1) {
    throw ConfigError("cannot use " + layout +
                      ": no pixels; valid: data != nullptr, width >= 1, height >= 1. Fix: pass "
                      "the frame's pointer and size.");
  }
  if (view.channels != 1 && view.channels != 3 && view.channels != 4) {
    throw ConfigError("cannot use " + layout +
                      ": valid channels are 1 (grey), 3 (RGB) or 4 (RGBA), 8 bits each, "
                      "interleaved. Fix: convert the frame (e.g. BGR to RGB) first.");
  }
  const size_t packed = static_cast<size_t>(view.width) * view.channels;
  const size_t stride = view.row_stride == 0 ? packed : view.row_stride;
  if (stride < packed) {
    throw ConfigError("cannot use " + layout + ": row_stride " + std::to_string(stride) +
                      " is smaller than a row (" + std::to_string(packed) +
                      " bytes). Fix: pass the buffer's real stride, or 0 for packed rows.");
  }
  check_pixels(layout, view.width, view.height);
  RgbImage out;
  out.width = view.width;
  out.height = view.height;
  out.data.resize(static_cast<size_t>(view.width) * view.height * 3);
  for (int y = 0; y < view.height; ++y) {
    const std::uint8_t* src = view.data + stride * y;
    std::uint8_t* dst = &out.data[static_cast<size_t>(y) * view.width * 3];
    for (int x = 0; x < view.width; ++x, src += view.channels, dst += 3) {
      if (view.channels == 1) {
        dst[0] = dst[1] = dst[2] = src[0];
      } else {
        dst[0] = src[0];
        dst[1] = src[1];
        dst[2] = src[2];
      }
    }
  }
  return out;
}

}  // namespace cops
