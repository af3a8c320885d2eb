#ifndef OPENMM_CGML_REFERENCE_KERNELS_H_
#define OPENMM_CGML_REFERENCE_KERNELS_H_

#include "openmm_cgml/CGMLKernels.h"
#include "openmm/KernelFactory.h"
#include <vector>

namespace CGML {

/**
 * The learned step on any platform whose data is ReferencePlatform::PlatformData
 * (Reference and CPU): positions and velocities are viewed as tensors without copying.
 */
class ReferenceIntegrateCGMLStepKernel : public IntegrateCGMLStepKernel {
public:
    ReferenceIntegrateCGMLStepKernel(std::string name, const OpenMM::Platform& platform)
        : IntegrateCGMLStepKernel(name, platform) {}
    void initialize(const OpenMM::System& system, const CGMLIntegrator& integrator) override;
    void execute(OpenMM::ContextImpl& context, CGMLIntegrator& integrator) override;
    void writeHistoryToContext(OpenMM::ContextImpl& context, CGMLIntegrator& integrator) override;
    double computeKineticEnergy(OpenMM::ContextImpl& context, const CGMLIntegrator& integrator) override;

private:
    std::vector<double> masses;
};

class ReferenceCGMLKernelFactory : public OpenMM::KernelFactory {
public:
    OpenMM::KernelImpl* createKernelImpl(std::string name, const OpenMM::Platform& platform,
                                         OpenMM::ContextImpl& context) const override;
};

/** Register the factory on every platform derived from ReferencePlatform (idempotent). */
void registerReferenceCGMLKernels();

} // namespace CGML

#endif
