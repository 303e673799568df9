import subprocess, sys
cases = {
 "assign_cb1d": "W.assign(torch.randn(4,4,device='cuda'), torch.randn(4,device='cuda'))",
 "assign_int": "W.assign(torch.ones(4,4,dtype=torch.int32,device='cuda'), torch.randn(1,4,device='cuda'))",
 "assign_devmismatch": "W.assign(torch.randn(4,4,device='cuda'), torch.randn(1,4))",
 "pack_bad": "W.pack(torch.ones(4,4,dtype=torch.int32,device='cuda'), 4)",
 "dequant_bad": "W.dequantize(torch.zeros(4,3,dtype=torch.uint8,device='cuda'), torch.randn(1,16,device='cuda'), 4, [4,8])",
 "sl_bad": "W.shared_linear(torch.randn(2,8,device='cuda'), torch.zeros(4,3,dtype=torch.uint8,device='cuda'), torch.randn(1,16,device='cuda'), 4, 4, 8)",
 "torch_raise": "torch.empty(3,device='cuda').view(5)",
}
cases.update({k + '_cpu': v.replace("device='cuda'", "device='cpu'") for k, v in list(cases.items())})
for name, code in cases.items():
    src = f"import torch, weightshare\nW=torch.ops.weightshare\ntry:\n    {code}\n    print('no error')\nexcept Exception as e:\n    print(type(e).__name__, str(e)[:120])\n"
    r = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True)
    print(name, "rc", r.returncode, r.stdout.strip()[:200], r.stderr.strip()[-300:] if r.returncode else "")
