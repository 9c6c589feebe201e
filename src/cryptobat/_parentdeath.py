"""Imported first by signzone's verifier fork server: it dies when signzone dies.

The fork server is a child of the signzone process; arming ``PR_SET_PDEATHSIG`` at
import (the fork server's preload) means a killed signzone leaves no fork server,
and through it no verifier processes (each arms the same for the fork server).
"""
import os

from .signing import die_with_parent

die_with_parent(os.getppid())
