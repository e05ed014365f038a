library(testthat)
library(scannot)

test_check("scannot")
