from services.rebalancer.service import RebalancerService
from shared.service import run_service

if __name__ == "__main__":
    run_service(RebalancerService)
