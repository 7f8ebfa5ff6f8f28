"""The peers forkcore is measured against: small echo servers and clients written for
this benchmark, one module each (`python -m benchmarks.peers.NAME server|client`)."""
