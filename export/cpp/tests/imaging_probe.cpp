// cops-imaging-probe: the C++ image pipeline from the command line, for the pytest that compares
// it with Pillow and the Python runtime (tests/edge/test_cpp.py). Not installed.
//
//   cops-imaging-probe decode IMAGE OUT             RGB bytes after orientation; prints "W H"
//   cops-imaging-probe resize LIST                  each line: IN W H OUT_W OUT_H OUT (raw RGB)
//   cops-imaging-probe tensor IMAGE SIZE M0 M1 M2 S0 S1 S2 OUT   float32 (3, SIZE, SIZE)
//   cops-imaging-probe resize-map IN W H OUT_W OUT_H OUT   float32 maps (bilinear, as Pillow 'F')
//   cops-imaging-probe regions IN W H THRESHOLD MIN_AREA MASK   float32 map -> uint8 mask;
//                      prints one line per region: x y width height area peak mean
// Exit status 1 with the error on stderr when something is refused.
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
#include <string>

#include "cops/calibration.hpp"
#include "cops/errors.hpp"
#include "cops/image.hpp"

namespace {

void write(const std::string& path, const void* data, size_t size) {
  std::ofstream out(path, std::ios::binary);
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(size));
  if (!out) throw cops::Error("cannot write " + path);
}

int resize_list(const std::string& list) {
  std::ifstream in(list);
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string src, dst;
    int w = 0, h = 0, ow = 0, oh = 0;
    if (!(fields >> src >> w >> h >> ow >> oh >> dst)) continue;
    std::ifstream raw(src, std::ios::binary);
    cops::RgbImage img;
    img.width = w;
    img.height = h;
    img.data.assign(std::istreambuf_iterator<char>(raw), std::istreambuf_iterator<char>());
    if (img.data.size() != static_cast<size_t>(w) * h * 3) throw cops::Error("bad size: " + src);
    const cops::RgbImage out = cops::resize_bicubic(img, ow, oh);
    write(dst, out.data.data(), out.data.size());
  }
  return 0;
}

std::vector<float> read_floats(const std::string& path, size_t count) {
  std::ifstream raw(path, std::ios::binary);
  std::vector<float> out(count);
  raw.read(reinterpret_cast<char*>(out.data()), static_cast<std::streamsize>(count * 4));
  if (!raw) throw cops::Error("cannot read " + std::to_string(count) + " floats from " + path);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string usage =
      "usage: cops-imaging-probe decode IMAGE OUT | resize LIST | "
      "tensor IMAGE SIZE M0 M1 M2 S0 S1 S2 OUT";
  try {
    const std::string cmd = argc > 1 ? argv[1] : "";
    if (cmd == "decode" && argc == 4) {
      const cops::RgbImage img = cops::load_image(argv[2]);
      write(argv[3], img.data.data(), img.data.size());
      std::cout << img.width << " " << img.height << "\n";
      return 0;
    }
    if (cmd == "resize" && argc == 3) return resize_list(argv[2]);
    if (cmd == "tensor" && argc == 11) {
      const int size = std::stoi(argv[3]);
      const std::array<double, 3> mean = {std::stod(argv[4]), std::stod(argv[5]),
                                          std::stod(argv[6])};
      const std::array<double, 3> std = {std::stod(argv[7]), std::stod(argv[8]),
                                         std::stod(argv[9])};
      std::vector<float> out(3ull * size * size);
      cops::preprocess_into(cops::load_image(argv[2]), size, mean, std, out.data());
      write(argv[10], out.data(), out.size() * sizeof(float));
      return 0;
    }
    if (cmd == "resize-map" && argc == 8) {
      const int w = std::stoi(argv[3]), h = std::stoi(argv[4]);
      const auto map = read_floats(argv[2], static_cast<size_t>(w) * h);
      const auto out = cops::resize_map_bilinear(map, w, h, std::stoi(argv[5]), std::stoi(argv[6]));
      write(argv[7], out.data(), out.size() * sizeof(float));
      return 0;
    }
    if (cmd == "regions" && argc == 8) {
      const int w = std::stoi(argv[3]), h = std::stoi(argv[4]);
      const auto map = read_floats(argv[2], static_cast<size_t>(w) * h);
      std::vector<std::uint8_t> mask;
      const auto regions =
          cops::defect_regions(map.data(), h, w, std::stod(argv[5]), std::stoi(argv[6]), &mask);
      write(argv[7], mask.data(), mask.size());
      std::cout.precision(17);
      for (const auto& r : regions) {
        std::cout << r.x << " " << r.y << " " << r.width << " " << r.height << " " << r.area
                  << " " << r.peak << " " << r.mean << "\n";
      }
      return 0;
    }
    std::cerr << usage << "\n";
    return 2;
  } catch (const std::exception& exc) {
    std::cerr << exc.what() << "\n";
    return 1;
  }
}
