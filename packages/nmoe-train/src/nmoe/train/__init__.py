"""nmoe.train"""
