// Decoding, EXIF orientation, buffer conversion and the Pillow-exact bicubic resize, against
// the Pillow results in fixtures.hpp (make_fixtures.py).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "cops/errors.hpp"
#include "cops/image.hpp"
#include "fixtures.hpp"

namespace {

cops::RgbImage decode(const std::vector<std::uint8_t>& bytes) {
  return cops::decode_image(bytes.data(), bytes.size(), "test image");
}

cops::RgbImage resize_source() {
  cops::RgbImage img;
  img.width = fixtures::kResizeSourceWidth;
  img.height = fixtures::kResizeSourceHeight;
  img.data = fixtures::kResizeSource;
  return img;
}

void expect_pixels(const cops::RgbImage& got, const std::vector<std::uint8_t>& want, int width) {
  EXPECT_EQ(got.width, width);
  EXPECT_EQ(got.height * got.width * 3, static_cast<int>(want.size()));
  EXPECT_EQ(got.data, want);
}

TEST(Resample, EqualsPillowBicubicDownUpAndOneAxis) {
  const std::vector<std::tuple<int, int, const std::vector<std::uint8_t>*>> cases = {
      {fixtures::kResize0Width, fixtures::kResize0Height, &fixtures::kResize0},
      {fixtures::kResize1Width, fixtures::kResize1Height, &fixtures::kResize1},
      {fixtures::kResize2Width, fixtures::kResize2Height, &fixtures::kResize2},
      {fixtures::kResize3Width, fixtures::kResize3Height, &fixtures::kResize3},
      {fixtures::kResize4Width, fixtures::kResize4Height, &fixtures::kResize4},
      {fixtures::kResize5Width, fixtures::kResize5Height, &fixtures::kResize5},
  };
  for (const auto& [w, h, want] : cases) {
    SCOPED_TRACE(std::to_string(w) + "x" + std::to_string(h));
    const cops::RgbImage out = cops::resize_bicubic(resize_source(), w, h);
    EXPECT_EQ(out.height, h);
    expect_pixels(out, *want, w);
  }
}

TEST(Resample, SameSizeIsACopy) {
  const cops::RgbImage src = resize_source();
  const cops::RgbImage out = cops::resize_bicubic(src, src.width, src.height);
  EXPECT_EQ(out.data, src.data);
}

TEST(Resample, ConstantImageStaysConstant) {
  cops::RgbImage flat;
  flat.width = 37;
  flat.height = 11;
  flat.data.assign(37 * 11 * 3, 200);
  for (int size : {1, 5, 98, 336}) {
    const cops::RgbImage out = cops::resize_bicubic(flat, size, size);
    for (auto v : out.data) ASSERT_EQ(v, 200) << size;
  }
}

TEST(Resample, RefusesEmptySizes) {
  EXPECT_THROW(cops::resize_bicubic(resize_source(), 0, 4), cops::ConfigError);
  EXPECT_THROW(cops::resize_bicubic(cops::RgbImage{}, 4, 4), cops::ConfigError);
}

TEST(Preprocess, NormalisesInFloat32ChannelsFirst) {
  cops::RgbImage px;
  px.width = px.height = 1;
  px.data = {0, 128, 255};
  std::vector<float> out(3 * 2 * 2);
  cops::preprocess_into(px, 2, {0.5, 0.25, 0.0}, {0.5, 0.25, 1.0}, out.data());
  EXPECT_FLOAT_EQ(out[0], (0.0f / 255.0f - 0.5f) / 0.5f);   // R plane
  EXPECT_FLOAT_EQ(out[4], (128.0f / 255.0f - 0.25f) / 0.25f);  // G plane
  EXPECT_FLOAT_EQ(out[11], 1.0f);                               // B plane, last pixel
}

TEST(Orientation, EveryExifValueAsPillowFromAPngEXIfChunk) {
  const std::vector<std::tuple<int, int, const std::vector<std::uint8_t>*,
                               const std::vector<std::uint8_t>*>>
      cases = {{2, fixtures::kOrient2Width, &fixtures::kOrientPng2, &fixtures::kOrient2},
               {3, fixtures::kOrient3Width, &fixtures::kOrientPng3, &fixtures::kOrient3},
               {4, fixtures::kOrient4Width, &fixtures::kOrientPng4, &fixtures::kOrient4},
               {5, fixtures::kOrient5Width, &fixtures::kOrientPng5, &fixtures::kOrient5},
               {6, fixtures::kOrient6Width, &fixtures::kOrientPng6, &fixtures::kOrient6},
               {7, fixtures::kOrient7Width, &fixtures::kOrientPng7, &fixtures::kOrient7},
               {8, fixtures::kOrient8Width, &fixtures::kOrientPng8, &fixtures::kOrient8}};
  for (const auto& [o, width, png, want] : cases) {
    SCOPED_TRACE("orientation " + std::to_string(o));
    expect_pixels(decode(*png), *want, width);
  }
}

TEST(Orientation, ValuesOutsideTwoToEightLeaveTheImage) {
  cops::RgbImage img;
  img.width = 3;
  img.height = 2;
  img.data = fixtures::kOrientSource;
  for (int o : {0, 1, 9, 255}) EXPECT_EQ(cops::apply_orientation(img, o).data, img.data);
}

TEST(Exif, ReadsOrientationWithOrWithoutTheExifHeader) {
  const auto& block = fixtures::kExif6;
  EXPECT_EQ(cops::exif_orientation(block.data(), block.size()), 6);
  EXPECT_EQ(cops::exif_orientation(block.data() + 6, block.size() - 6), 6);
  const std::uint8_t junk[] = {1, 2, 3, 4};
  EXPECT_EQ(cops::exif_orientation(junk, sizeof(junk)), 0);
}

TEST(Decode, JpegAsPillow) {
  expect_pixels(decode(fixtures::kJpeg), fixtures::kJpegPixels, 10);
}

TEST(Decode, JpegWithExifOrientationIsRotated) {
  expect_pixels(decode(fixtures::kJpegExif6), fixtures::kJpegExif6Pixels, 6);
}

TEST(Decode, CmykJpegAsPillowConvert) {
  expect_pixels(decode(fixtures::kJpegCmyk), fixtures::kJpegCmykPixels, 10);
}

TEST(Decode, PalettePngWithTransparencyKeepsPaletteColours) {
  expect_pixels(decode(fixtures::kPngPalette), fixtures::kPngPalettePixels, 10);
}

TEST(Decode, Grey16PngIsShiftedBy8AndRepeated) {
  expect_pixels(decode(fixtures::kPngGrey16), fixtures::kPngGrey16Pixels, 4);
}

TEST(Decode, GreyAlphaPngDropsAlpha) {
  expect_pixels(decode(fixtures::kPngGreyAlpha), fixtures::kPngGreyAlphaPixels, 4);
}

TEST(Decode, BilevelPngIsZeroOr255) {
  expect_pixels(decode(fixtures::kPngBilevel), fixtures::kPngBilevelPixels, 9);
}

TEST(Decode, RefusesOtherFormatsNamingTheFix) {
  try {
    decode(fixtures::kBmp);
    FAIL() << "a BMP was accepted";
  } catch (const cops::ImageError& exc) {
    EXPECT_NE(std::string(exc.what()).find("convert the image to PNG"), std::string::npos);
  }
}

TEST(Decode, RefusesTruncatedJpegAndPng) {
  for (const auto* file : {&fixtures::kJpeg, &fixtures::kPngPalette}) {
    // Cut inside the headers, and inside the image data (the end marker lost).
    for (const size_t keep : {file->size() * 2 / 3, file->size() - 10}) {
      std::vector<std::uint8_t> cut(file->begin(), file->begin() + keep);
      try {
        decode(cut);
        ADD_FAILURE() << "a file cut to " << keep << " bytes was accepted";
      } catch (const cops::ImageError& exc) {
        EXPECT_NE(std::string(exc.what()).find("truncated or corrupt"), std::string::npos);
      }
    }
  }
}

TEST(Decode, RefusesAPngWithABadChecksumEvenOfAnAncillaryChunk) {
  std::vector<std::uint8_t> bad = fixtures::kPngGrey16;
  bad[bad.size() - 20] ^= 0xFF;  // inside the IDAT data or its CRC
  EXPECT_THROW(decode(bad), cops::ImageError);
  // The eXIf chunk's CRC (Pillow's verify() refuses any bad chunk checksum).
  bad = fixtures::kOrientPng6;
  const std::string tag = "eXIf";
  const auto at = std::search(bad.begin(), bad.end(), tag.begin(), tag.end()) - bad.begin();
  const size_t length = (bad[at - 4] << 24) | (bad[at - 3] << 16) | (bad[at - 2] << 8) | bad[at - 1];
  bad[at + 4 + length] ^= 0xFF;
  EXPECT_THROW(decode(bad), cops::ImageError);
}

TEST(LoadImage, RefusesMissingEmptyAndFolderNamingTheFile) {
  const auto dir = std::filesystem::temp_directory_path() / "cops_test_load_image";
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "empty.png").close();
  for (const auto& path : {dir / "missing.png", dir / "empty.png", dir}) {
    try {
      cops::load_image(path);
      FAIL() << path;
    } catch (const cops::ImageError& exc) {
      EXPECT_NE(std::string(exc.what()).find(path.string()), std::string::npos) << exc.what();
      EXPECT_NE(std::string(exc.what()).find("Fix:"), std::string::npos) << exc.what();
    }
  }
  std::filesystem::remove_all(dir);
}

TEST(ToRgb, GreyRgbaAndStrides) {
  const std::uint8_t grey[] = {1, 2, 9, 9, 3, 4, 9, 9};  // 2x2, stride 4
  const cops::RgbImage g = cops::to_rgb({grey, 2, 2, 1, 4});
  EXPECT_EQ(g.data, (std::vector<std::uint8_t>{1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4}));
  const std::uint8_t rgba[] = {1, 2, 3, 255, 4, 5, 6, 0};
  const cops::RgbImage c = cops::to_rgb({rgba, 2, 1, 4, 0});
  EXPECT_EQ(c.data, (std::vector<std::uint8_t>{1, 2, 3, 4, 5, 6}));
}

TEST(ToRgb, RefusesBadLayouts) {
  const std::uint8_t px[12] = {};
  EXPECT_THROW(cops::to_rgb({nullptr, 2, 2, 3, 0}), cops::ConfigError);
  EXPECT_THROW(cops::to_rgb({px, 0, 2, 3, 0}), cops::ConfigError);
  EXPECT_THROW(cops::to_rgb({px, 2, 2, 2, 0}), cops::ConfigError);
  EXPECT_THROW(cops::to_rgb({px, 2, 2, 3, 5}), cops::ConfigError);
}

}  // namespace
