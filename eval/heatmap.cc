#include "eval/heatmap.h"

#include <cairo-svg.h>
#include <cairo.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <set>

#include "engine/base/error.h"

namespace needle::eval {

HeatmapGrid BuildGrid(const std::vector<EvalResult>& results, const std::string& config) {
  std::set<double> depths;
  std::set<int64_t> lengths;
  std::map<std::pair<double, int64_t>, std::pair<double, int>> acc;
  for (const auto& r : results) {
    if (r.config != config) continue;
    const double d = std::round(r.depth * 100000.0) / 1000.0;  // percent, 3 decimals
    depths.insert(d);
    lengths.insert(r.length);
    auto& a = acc[{d, r.length}];
    a.first += r.score, a.second += 1;
  }
  HeatmapGrid g;
  g.depths.assign(depths.begin(), depths.end());
  g.lengths.assign(lengths.begin(), lengths.end());
  g.score.assign(g.depths.size(), std::vector<double>(g.lengths.size(), -1.0));
  for (size_t i = 0; i < g.depths.size(); ++i)
    for (size_t j = 0; j < g.lengths.size(); ++j) {
      auto it = acc.find({g.depths[i], g.lengths[j]});
      if (it != acc.end()) g.score[i][j] = it->second.first / it->second.second;
    }
  return g;
}

void ScoreColor(double s, double rgb[3]) {
  static const double kStops[3][3] = {{0xF0 / 255.0, 0x49 / 255.0, 0x6E / 255.0},
                                      {0xEB / 255.0, 0xB8 / 255.0, 0x39 / 255.0},
                                      {0x0C / 255.0, 0xD7 / 255.0, 0x9F / 255.0}};
  s = std::clamp(s, 0.0, 1.0);
  const int k = s < 0.5 ? 0 : 1;
  const double t = s < 0.5 ? s / 0.5 : (s - 0.5) / 0.5;
  for (int c = 0; c < 3; ++c) rgb[c] = kStops[k][c] * (1 - t) + kStops[k + 1][c] * t;
}

namespace {

void Draw(cairo_t* cr, const HeatmapGrid& g, const std::string& title, double W, double H) {
  const double left = 90, right = 110, top = 60, bottom = 90;
  const double gw = W - left - right, gh = H - top - bottom;
  cairo_set_source_rgb(cr, 1, 1, 1);
  cairo_paint(cr);
  cairo_select_font_face(cr, "sans-serif", CAIRO_FONT_SLANT_NORMAL, CAIRO_FONT_WEIGHT_NORMAL);
  const size_t nr = g.depths.size(), nc = g.lengths.size();
  const double cw = nc ? gw / static_cast<double>(nc) : gw,
               ch = nr ? gh / static_cast<double>(nr) : gh;
  for (size_t i = 0; i < nr; ++i) {
    for (size_t j = 0; j < nc; ++j) {
      double rgb[3] = {0.9, 0.9, 0.9};  // no sample: light grey
      if (g.score[i][j] >= 0) ScoreColor(g.score[i][j], rgb);
      cairo_set_source_rgb(cr, rgb[0], rgb[1], rgb[2]);
      cairo_rectangle(cr, left + j * cw, top + i * ch, cw, ch);
      cairo_fill(cr);
    }
  }
  cairo_set_source_rgb(cr, 0.1, 0.1, 0.1);
  cairo_set_font_size(cr, 11);
  char buf[64];
  for (size_t i = 0; i < nr; ++i) {  // y ticks: depth percent
    std::snprintf(buf, sizeof buf, "%g", g.depths[i]);
    cairo_move_to(cr, left - 8 - 6.0 * std::strlen(buf), top + (i + 0.5) * ch + 4);
    cairo_show_text(cr, buf);
  }
  for (size_t j = 0; j < nc; ++j) {  // x ticks: token limit, rotated 45 degrees
    std::snprintf(buf, sizeof buf, "%lld", static_cast<long long>(g.lengths[j]));
    cairo_save(cr);
    cairo_move_to(cr, left + (j + 0.5) * cw - 4, top + gh + 12);
    cairo_rotate(cr, M_PI / 4);
    cairo_show_text(cr, buf);
    cairo_restore(cr);
  }
  cairo_set_font_size(cr, 14);
  cairo_move_to(cr, left + gw / 2 - 40, H - 15);
  cairo_show_text(cr, "Token Limit");
  cairo_save(cr);
  cairo_move_to(cr, 22, top + gh / 2 + 45);
  cairo_rotate(cr, -M_PI / 2);
  cairo_show_text(cr, "Depth Percent");
  cairo_restore(cr);
  cairo_set_font_size(cr, 16);
  cairo_move_to(cr, left, 35);
  cairo_show_text(cr, title.c_str());
  // Colour bar.
  const double bx = W - right + 30, bw = 18;
  for (int k = 0; k < 200; ++k) {
    double rgb[3];
    ScoreColor(1.0 - k / 199.0, rgb);
    cairo_set_source_rgb(cr, rgb[0], rgb[1], rgb[2]);
    cairo_rectangle(cr, bx, top + gh * k / 200.0, bw, gh / 200.0 + 0.5);
    cairo_fill(cr);
  }
  cairo_set_source_rgb(cr, 0.1, 0.1, 0.1);
  cairo_set_font_size(cr, 11);
  for (double v : {0.0, 0.5, 1.0}) {
    std::snprintf(buf, sizeof buf, "%.1f", v);
    cairo_move_to(cr, bx + bw + 5, top + gh * (1.0 - v) + 4);
    cairo_show_text(cr, buf);
  }
  cairo_move_to(cr, bx - 2, top - 8);
  cairo_show_text(cr, "Score");
}

}  // namespace

void WriteHeatmap(const HeatmapGrid& g, const std::string& title, const std::string& base) {
  const double W = 1050, H = 480;  // the original's 17.5 x 8 aspect
  {
    cairo_surface_t* s =
        cairo_image_surface_create(CAIRO_FORMAT_RGB24, static_cast<int>(W), static_cast<int>(H));
    cairo_t* cr = cairo_create(s);
    Draw(cr, g, title, W, H);
    cairo_destroy(cr);
    const cairo_status_t st = cairo_surface_write_to_png(s, (base + ".png").c_str());
    cairo_surface_destroy(s);
    if (st != CAIRO_STATUS_SUCCESS) Fail(base, ".png: cannot write: ", cairo_status_to_string(st));
  }
  cairo_surface_t* s = cairo_svg_surface_create((base + ".svg").c_str(), W, H);
  cairo_t* cr = cairo_create(s);
  Draw(cr, g, title, W, H);
  cairo_destroy(cr);
  cairo_surface_finish(s);
  const cairo_status_t st = cairo_surface_status(s);
  cairo_surface_destroy(s);
  if (st != CAIRO_STATUS_SUCCESS) Fail(base, ".svg: cannot write: ", cairo_status_to_string(st));
}

}  // namespace needle::eval
