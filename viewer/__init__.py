"""The live browser viewer (viser), installed as `gen3d.viewer`.

It sees only a small protocol (a render callback, a scene snapshot, controls), never a concrete
system class. The viewer itself arrives with the viewer issue.
"""
