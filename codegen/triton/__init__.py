"""condfx.codegen.triton"""
