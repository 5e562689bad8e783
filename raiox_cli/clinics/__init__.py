"""clinics"""
