"""condfx.codegen"""
