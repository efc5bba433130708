#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>

#include "engine/base/mapped_file.h"
#include "eval/heatmap.h"
#include "tests/test_util.h"

namespace needle::eval {
namespace {

TEST(Heatmap, GridColoursAndFiles) {
  std::vector<EvalResult> rs;
  for (int64_t len : {1000, 2000})
    for (double d : {0.0, 0.5, 1.0})
      for (double sc : {1.0, len == 2000 && d == 0.5 ? 0.0 : 1.0}) {
        EvalResult r;
        r.config = "dense", r.task = "needle", r.length = len, r.depth = d, r.score = sc;
        rs.push_back(r);
      }
  EvalResult other;
  other.config = "sparse", other.length = 4000, other.depth = 0.25, other.score = 0;
  rs.push_back(other);
  const HeatmapGrid g = BuildGrid(rs, "dense");
  EXPECT_EQ(g.depths, (std::vector<double>{0, 50, 100}));
  EXPECT_EQ(g.lengths, (std::vector<int64_t>{1000, 2000}));
  EXPECT_DOUBLE_EQ(g.score[1][1], 0.5);  // mean of the cell's samples
  EXPECT_DOUBLE_EQ(g.score[0][0], 1.0);
  double lo[3], mid[3], hi[3];
  ScoreColor(0, lo), ScoreColor(0.5, mid), ScoreColor(1, hi);
  EXPECT_NEAR(lo[0], 0xF0 / 255.0, 1e-9);   // #F0496E
  EXPECT_NEAR(mid[1], 0xB8 / 255.0, 1e-9);  // #EBB839
  EXPECT_NEAR(hi[2], 0x9F / 255.0, 1e-9);   // #0CD79F
  test::TempDir d;
  WriteHeatmap(g, "test", d.File("h"));
  EXPECT_EQ(ReadTextFile(d.File("h.png")).substr(1, 3), "PNG");
  EXPECT_NE(ReadTextFile(d.File("h.svg")).find("<svg"), std::string::npos);
}

}  // namespace
}  // namespace needle::eval
