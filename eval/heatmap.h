// The needle-in-a-haystack heatmap, drawn like the original visualisation
// (viz/CreateVizFromLLMTesting.ipynb): mean score per (depth, context length) cell, colours from
// #F0496E (0) through #EBB839 to #0CD79F (1), x "Token Limit", y "Depth Percent", a "Score"
// colour bar. Written with cairo as PNG and SVG.
#pragma once

#include <string>
#include <vector>

#include "eval/runner.h"

namespace needle::eval {

// Cells from the results of one configuration: rows = depths (ascending), columns = lengths.
struct HeatmapGrid {
  std::vector<double> depths;              // percent
  std::vector<int64_t> lengths;            // tokens
  std::vector<std::vector<double>> score;  // [depth][length], -1 = no sample
};

HeatmapGrid BuildGrid(const std::vector<EvalResult>& results, const std::string& config);
// RGB in [0, 1] of a score in [0, 1].
void ScoreColor(double score, double rgb[3]);
// Writes path_base.png and path_base.svg; throws naming the file on failure.
void WriteHeatmap(const HeatmapGrid& g, const std::string& title, const std::string& path_base);

}  // namespace needle::eval
