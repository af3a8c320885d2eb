#ifndef OPENMM_CGML_KERNELS_H_
#define OPENMM_CGML_KERNELS_H_

#include "openmm_cgml/CGMLIntegrator.h"
#include "openmm/KernelImpl.h"
#include "openmm/System.h"
#include <string>

namespace CGML {

/**
 * The platform-specific half of one learned step: it hands the context's positions,
 * velocities and box to CGMLIntegrator's LearnedStep and writes the prediction back.
 */
class IntegrateCGMLStepKernel : public OpenMM::KernelImpl {
public:
    static std::string Name() { return "IntegrateCGMLStep"; }
    IntegrateCGMLStepKernel(std::string name, const OpenMM::Platform& platform) : OpenMM::KernelImpl(name, platform) {}
    virtual void initialize(const OpenMM::System& system, const CGMLIntegrator& integrator) = 0;
    /** Advance by one learned step. */
    virtual void execute(OpenMM::ContextImpl& context, CGMLIntegrator& integrator) = 0;
    /** Make the context's positions/velocities the newest history frame. */
    virtual void writeHistoryToContext(OpenMM::ContextImpl& context, CGMLIntegrator& integrator) = 0;
    virtual double computeKineticEnergy(OpenMM::ContextImpl& context, const CGMLIntegrator& integrator) = 0;
};

} // namespace CGML

#endif
