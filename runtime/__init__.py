"""condfx.runtime"""
