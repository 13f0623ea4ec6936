import bngraph, torch, sys
sys.path.insert(0, '/tmp/adv18/envvariety')
from model import Net
m = Net()
r = bngraph.insert(m, torch.randn(2,1,28,28))
print(type(r))
