"""edgefed on Flower's engines: a ServerApp whose loop is edgefed's round (`FlowerTransport` carries it
over Flower's Grid) and a ClientApp that trains with edgefed's worker, for Flower's Simulation Engine
(Ray) and its Deployment Engine (SuperLink and SuperNodes)."""
