#pragma once
// Error messages for the input checks: WS_CHECK / WS_CHECK_VALUE / WS_CHECK_TYPE raise what TORCH_CHECK /
// TORCH_CHECK_VALUE / TORCH_CHECK_TYPE raise (RuntimeError / ValueError / TypeError in Python), with the message
// built here into one std::string, which c10::str passes through untouched.
//
// Why not c10::str's std::ostringstream: on the H200 machine's image (torch 2.11, Python 3.12), every failing check
// whose message streamed a number from this module segfaulted, on CPU and CUDA tensors alike ("bits must be in
// 1..8, got 0"), while messages of strings, dtypes and shapes formatted with std::to_string raised cleanly
// (benchmarks/results/gpu/2026-11-30-H200-run1: 33 bad-input cases crashed their test worker). Numbers therefore go
// through std::to_string / snprintf, and no part of a message touches an ostream.
#include <ATen/core/Tensor.h>

#include <cstdio>
#include <string>
#include <string_view>
#include <type_traits>

namespace weightshare {

std::string shape_str(at::IntArrayRef shape);  // "[4, 8]" (checks.cpp)

namespace message_detail {
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, std::string_view v) { s.append(v.data(), v.size()); }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, char v) { s += v; }
inline void append(std::string& s, bool v) { s += v ? "true" : "false"; }
template <typename I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
void append(std::string& s, I v) {
  s += std::to_string(v);
}
inline void append(std::string& s, double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  s += buf;
}
inline void append(std::string& s, float v) { append(s, static_cast<double>(v)); }
inline void append(std::string& s, at::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }
inline void append(std::string& s, at::IntArrayRef v) { s += shape_str(v); }
}  // namespace message_detail

template <typename... A>
std::string message(const A&... parts) {
  std::string s;
  (message_detail::append(s, parts), ...);
  return s;
}

}  // namespace weightshare

// The message arguments are evaluated only when the check fails (inside TORCH_CHECK's failure branch).
#define WS_CHECK(cond, ...) TORCH_CHECK(cond, ::weightshare::message(__VA_ARGS__))
#define WS_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::weightshare::message(__VA_ARGS__))
#define WS_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, ::weightshare::message(__VA_ARGS__))
