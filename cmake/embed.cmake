# embed.cmake - turn a file into a C array, for assets the worker serves itself
# (csrc/dashboard.html): the page then always matches the binary's API, and nothing has
# to be found on disk at run time.
#   bw_embed(<input file> <output .c> <symbol>)
function(bw_embed input output symbol)
  file(READ "${input}" hex HEX)
  string(LENGTH "${hex}" nhex)
  math(EXPR n "${nhex} / 2")
  string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," bytes "${hex}")
  string(REGEX REPLACE "(0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,)" "\\1\n" bytes "${bytes}")
  set(text "/* generated from ${input} by cmake/embed.cmake; do not edit */\n#include <stddef.h>\n")
  string(APPEND text "const unsigned char ${symbol}[] = {\n${bytes}0x00};\n")
  string(APPEND text "const size_t ${symbol}_len = ${n};\n")
  # written only when it changed: an unchanged page rebuilds nothing
  if(EXISTS "${output}")
    file(READ "${output}" old)
  endif()
  if(NOT "${old}" STREQUAL "${text}")
    file(WRITE "${output}" "${text}")
  endif()
  set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS "${input}")
endfunction()
